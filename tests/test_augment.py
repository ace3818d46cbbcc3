"""Augmentation: each transform on crafted inputs, determinism, config errors, and the
autoscaling pool of real Ray actors (a Ray Serve deployment on the session cluster)."""

import re
import threading
import time

import pytest
from support import synthetic_docs, wait_for

from raycpt.augment import Augmenter, AugmentError, strength_at
from raycpt.augment_pool import DEPLOYMENT, deploy, local_transform, pool_transform, shutdown
from raycpt.config import AugmentConfig, ConfigError, parse_config


def aug(transforms, **kw) -> Augmenter:
    return Augmenter(AugmentConfig(enabled=True, transforms=transforms, **kw))


@pytest.fixture
def lexicon(tmp_path):
    path = tmp_path / "lexicon.txt"
    path.write_text(
        "# cardiology\nmyocardial infarction | MI | heart attack\n"
        "blood pressure | BP\nhypertension | high blood pressure\n"
    )
    return str(path)


def test_lexicon_is_whole_word_case_preserving_and_respects_protected_terms(lexicon):
    a = aug(
        [{"type": "lexicon", "path": lexicon, "rate": 1.0, "p": 1.0}],
        protected_terms=["MI-5 protocol"],
    )
    text = (
        "Heart attack confirmed. The heart attack was severe. HEART ATTACK code. "
        "Follow the MI-5 protocol. Amid the bpm readings, blood pressure fell."
    )
    out, counts = a.apply(text, "doc-1", 0, 0.0)
    assert "Heart attack" not in out and "heart attack" not in out
    assert out.startswith(("Myocardial infarction confirmed", "MI confirmed"))  # Title case kept
    assert "MI-5 protocol" in out  # protected
    assert "Amid" in out and "bpm" in out  # no partial-word matches ("mi" in "Amid")
    assert "BP fell" in out  # lower-case phrase -> the acronym keeps its own casing
    assert counts["lexicon/docs"] == 1 and counts["lexicon/edits"] == 4


def test_noise_rate_is_bounded_and_protected_terms_survive():
    text = " ".join(synthetic_docs(5, seed=3)) + " Take Xarelto 20 mg daily."
    a = aug([{"type": "noise", "rate": 0.02, "p": 1.0}], protected_terms=["Xarelto"])
    for i in range(20):
        out, counts = a.apply(text, f"d{i}", 0, 0.0)
        assert "Xarelto" in out
        assert 0 < counts["noise/edits"] <= int(len(text) * 0.02)
        changed = sum(x != y for x, y in zip(out, text, strict=False))
        assert changed > 0


def test_format_variants_of_dates_numbers_and_units():
    a = aug([{"type": "format", "rate": 1.0, "p": 1.0}])
    out, counts = a.apply("Seen on 2024-03-05, dose 250 mg, cohort of 12000 patients.", "x", 0, 0)
    assert "2024-03-05" not in out and re.search(r"5 March 2024|March 5, 2024|05/03/2024", out)
    assert "12,000" in out
    assert re.search(r"250 ?(mg|milligrams)", out)
    assert counts["format/edits"] >= 2


def test_sentence_transform_never_drops_a_protected_sentence():
    text = " ".join(f"Sentence number {i} is here." for i in range(30)) + " Give 5 mg of Warfarin."
    a = aug(
        [{"type": "sentence", "drop_rate": 0.5, "swap_rate": 0.5, "window": 2, "p": 1.0}],
        protected_terms=["Warfarin"],
    )
    for i in range(10):
        out, counts = a.apply(text, f"d{i}", 0, 0.0)
        assert "Give 5 mg of Warfarin." in out
        assert counts["sentence/edits"] > 0
        kept = [int(n) for n in re.findall(r"number (\d+)", out)]
        assert len(kept) < 30  # some dropped
        assert all(abs(pos - n) <= 2 * 2 + 15 for pos, n in enumerate(kept))  # local moves only


def test_output_depends_only_on_id_epoch_seed_and_config(lexicon):
    cfg = [
        {"type": "lexicon", "path": lexicon, "rate": 0.5, "p": 0.9},
        {"type": "noise", "rate": 0.02, "p": 0.9},
    ]
    text = "The heart attack raised blood pressure; hypertension followed. " * 5
    a, b = aug(cfg), aug(cfg)
    assert a.apply(text, "id", 0, 0.3) == b.apply(text, "id", 0, 0.3)
    assert a.apply(text, "id", 1, 0.3)[0] != a.apply(text, "id", 0, 0.3)[0]  # new epoch
    assert aug(cfg, seed=1).apply(text, "id", 0, 0.3)[0] != a.apply(text, "id", 0, 0.3)[0]


def test_schedules_and_off_after():
    from raycpt.config import StrengthPoint

    sched = [StrengthPoint(at=0, strength=0.2), StrengthPoint(at=1, strength=1.0)]
    assert strength_at(sched, None, 0.5) == pytest.approx(0.6)
    assert strength_at(sched, 0.9, 0.95) == 0.0
    a = aug([{"type": "noise", "rate": 0.05, "p": 1.0, "off_after": 0.8}])
    text = " ".join(synthetic_docs(3))
    assert a.apply(text, "d", 0, 0.85) == (text, {})
    assert a.apply(text, "d", 0, 0.5)[0] != text


def test_custom_callable_plugin():
    a = aug(
        [
            {
                "type": "custom",
                "callable": "augment_plugins:shout",
                "params": {"suffix": "?"},
                "p": 1.0,
            }
        ]
    )
    assert a.apply("hello", "d", 0, 0.0)[0] == "HELLO?"


def test_bad_configuration_fails_before_training(tmp_path):
    base = {
        "name": "r",
        "storage_path": "/tmp/x",
        "model": {"path": "/m"},
        "data": {"sources": [{"name": "d", "path": "/d"}]},
        "train": {"max_steps": 1, "micro_batch_size": 1, "global_batch_size": 1, "lr": 1e-4},
    }
    with pytest.raises(ConfigError, match="does not match any of the expected tags: 'lexicon'"):
        parse_config({**base, "augment": {"transforms": [{"type": "paraphrase"}]}})
    with pytest.raises(ConfigError, match=r"augment\.transforms\.0\.noise\.p"):
        parse_config({**base, "augment": {"transforms": [{"type": "noise", "p": 1.2}]}})
    with pytest.raises(ConfigError, match="min_actors 3 > max_actors 2"):
        parse_config({**base, "augment": {"pool": {"min_actors": 3, "max_actors": 2}}})
    with pytest.raises(AugmentError, match="lexicon .*missing.txt cannot be read"):
        aug([{"type": "lexicon", "path": str(tmp_path / "missing.txt")}])
    bad = tmp_path / "bad.txt"
    bad.write_text("lonely-term\n")
    with pytest.raises(AugmentError, match="bad.txt:1: a lexicon line needs at least two terms"):
        aug([{"type": "lexicon", "path": str(bad)}])
    with pytest.raises(AugmentError, match="nosuchmodule"):
        aug([{"type": "custom", "callable": "nosuchmodule:f"}])


def pool_actors(states=("ALIVE",)) -> int:
    """Actors of the augmentation pool in the given states, from Ray's state API."""
    from ray.util.state import list_actors

    return sum(
        1
        for a in list_actors(limit=1000)
        if a.state in states
        and (DEPLOYMENT in (a.class_name or "") or DEPLOYMENT in (a.name or ""))
    )


# an actor the pool asked for: being placed or started, or running
REQUESTED = ("ALIVE", "PENDING_CREATION", "DEPENDENCIES_UNREADY", "RESTARTING")


def test_pool_is_deterministic_across_sizes_and_matches_in_process(ray_cluster, lexicon):
    cfg = AugmentConfig(
        enabled=True,
        transforms=[
            {"type": "lexicon", "path": lexicon, "rate": 0.5, "p": 0.8},
            {"type": "noise", "rate": 0.02, "p": 0.8},
            {"type": "sentence", "p": 0.5},
        ],
    )
    texts = [t + " The heart attack raised blood pressure." for t in synthetic_docs(100)]
    ids = [f"doc{i}" for i in range(100)]
    expected = local_transform(cfg)(texts, ids, 2, 0.4)
    assert expected[0] != texts
    for size in (1, 3):
        c = cfg.model_copy(
            update={"pool": cfg.pool.model_copy(update={"min_actors": size, "max_actors": size})}
        )
        app = deploy(c, f"det{size}")
        try:
            assert pool_transform(app, batch_docs=7)(texts, ids, 2, 0.4) == expected
        finally:
            shutdown(app)


def test_pool_grows_under_load_and_shrinks_when_idle(ray_cluster):
    cfg = AugmentConfig(
        enabled=True,
        transforms=[
            {
                "type": "custom",
                "callable": "augment_plugins:slow_identity",
                "p": 1.0,
                "params": {"delay": 0.05},
            }
        ],
        pool={
            "min_actors": 1,
            "max_actors": 3,
            "cpus_per_actor": 0.5,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 0.5,
            "downscale_delay_s": 2,
        },
    )
    app = deploy(cfg, "scale")
    try:
        assert pool_actors() == 1
        transform = pool_transform(app, batch_docs=4)
        stop = threading.Event()

        def feed():
            while not stop.is_set():
                transform(["x"] * 16, [str(i) for i in range(16)], 0, 0.0)

        feeders = [threading.Thread(target=feed) for _ in range(12)]
        for f in feeders:
            f.start()
        try:
            peak = wait_for(lambda: n if (n := pool_actors(REQUESTED)) >= 2 else 0, timeout=120)
        finally:
            stop.set()
            for f in feeders:
                f.join()
        assert peak >= 2
        wait_for(lambda: pool_actors(REQUESTED) == 1, timeout=120)
    finally:
        shutdown(app)
    time.sleep(0.5)


def test_augment_preview_command_shows_before_and_after(
    domain_dataset, base_model_dir, tmp_path, capsys
):
    import yaml

    from raycpt.cli import main

    cfg = {
        "name": "p",
        "storage_path": str(tmp_path),
        "model": {"path": str(base_model_dir)},
        "data": {"sources": [{"name": "domain", "path": str(domain_dataset)}]},
        "train": {"max_steps": 1, "micro_batch_size": 1, "global_batch_size": 1, "lr": 1e-4},
        "augment": {
            "enabled": True,
            "protected_terms": ["aspirin"],
            "transforms": [{"type": "custom", "callable": "augment_plugins:shout", "p": 1.0}],
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["augment-preview", "--config", str(path), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- before") == 2 and out.count("+++ after") == 2
    assert "RECORD" in out and "record" in out and "custom/docs" in out
    assert "!aspirin" in out or " aspirin " in out.split("+++ after")[1]  # protected
