"""Evaluation: perplexity against a direct `transformers` computation, calibration on a case with
a known answer, sharded evaluation inside real Ray Train runs (2 workers = 1 worker = standalone),
early stopping, best-checkpoint retention, `raycpt eval` on a checkpoint and the HTML report."""

import json
import math
import random

import numpy as np
import pytest
import torch

from raycpt import checkpoint as ckpt
from raycpt.config import EarlyStopConfig, parse_config
from raycpt.evaluate import (
    EvalSet,
    evaluate_folder,
    evaluate_model,
    evaluate_set,
    load_set,
    token_stats,
)
from raycpt.train import launch
from raycpt.train.evaluation import stop_reason

GENERAL_WORDS = (
    "weather river market music train city garden book coffee window mountain story "
    "football kitchen holiday painting letter bridge forest evening"
).split()


@pytest.fixture(scope="module")
def general_dataset(tmp_path_factory):
    """A second prepared corpus, in other words than the domain's: the 'general' role."""
    from support import write_jsonl

    from raycpt.config import PrepareConfig
    from raycpt.prepare import prepare

    rng = random.Random(5)
    texts = [
        f"note {i}: " + " ".join(rng.choice(GENERAL_WORDS) for _ in range(rng.randint(20, 80)))
        for i in range(200)
    ]
    root = tmp_path_factory.mktemp("general")
    write_jsonl(root / "raw" / "g.jsonl", texts)
    prepare(
        PrepareConfig(inputs=[str(root / "raw")], output=str(root / "out"), heldout_fraction=0.2)
    )
    return root / "out"


def _model_and_tokenizer(base_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(base_model_dir)


def test_perplexity_matches_transformers_own_loss(base_model_dir, domain_dataset):
    model, tok = _model_and_tokenizer(base_model_dir)
    data = load_set("domain", str(domain_dataset), "heldout", tok, 64, 2048)
    ours = evaluate_model(model, data, batch_size=3)
    # transformers' own shifted, mean-reduced causal-LM loss, one block at a time
    nll = 0.0
    with torch.no_grad():
        for block in data.blocks:
            x = torch.from_numpy(block).long()[None]
            nll += model(input_ids=x, labels=x).loss.item() * (x.shape[1] - 1)
    count = len(data.blocks) * 63
    assert ours.tokens == count
    assert ours.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert ours.bits_per_byte == pytest.approx(
        nll / math.log(2) / (count * data.bytes_per_token), rel=1e-5
    )


def test_ece_of_a_constructed_case():
    # 10 predictions at confidence 0.85 of which 8 are right (bin gap 10 x |0.8 - 0.85| = 0.5)
    # and 20 at 0.65 of which 13 are right (calibrated, gap 0): ECE = (0.5 + 0) / 30.
    hi = torch.log(torch.tensor([0.85, 0.15]))
    lo = torch.log(torch.tensor([0.65, 0.35]))
    logits = torch.stack([hi] * 10 + [lo] * 20)
    targets = torch.tensor([0] * 8 + [1] * 2 + [0] * 13 + [1] * 7)
    r = token_stats(logits, targets, bins=10)
    assert r.ece == pytest.approx(0.5 / 30, abs=1e-6)
    assert r.accuracy == pytest.approx(21 / 30)
    assert r.bin_count[8] == 10 and r.bin_count[6] == 20  # (0.8, 0.9] and (0.6, 0.7]
    expected_nll = -(
        8 * math.log(0.85) + 2 * math.log(0.15) + 13 * math.log(0.65) + 7 * math.log(0.35)
    )
    assert r.nll_sum == pytest.approx(expected_nll, rel=1e-6)


def test_shards_add_up_to_the_whole_set(base_model_dir, domain_dataset):
    model, tok = _model_and_tokenizer(base_model_dir)
    data = load_set("domain", str(domain_dataset), "heldout", tok, 64, 1500)
    assert len(data.blocks) % 2 == 1  # an odd count: one worker gets a padding block

    def fwd(x):
        return model(input_ids=x).logits

    whole = evaluate_set(fwd, data, 4, torch.device("cpu"))
    parts = [evaluate_set(fwd, data, 4, torch.device("cpu"), rank=r, world=2) for r in (0, 1)]
    total = parts[0] + parts[1]
    assert total.tokens == whole.tokens
    assert total.perplexity == pytest.approx(whole.perplexity, rel=1e-9)
    assert total.ece == pytest.approx(whole.ece, rel=1e-9)
    assert np.array_equal(total.bin_count, whole.bin_count)


def test_an_empty_set_is_refused_with_a_fix(base_model_dir, domain_dataset):
    _, tok = _model_and_tokenizer(base_model_dir)
    with pytest.raises(ValueError, match="has no split 'nope'.*heldout_fraction"):
        load_set("x", str(domain_dataset), "nope", tok, 64, 100)
    assert isinstance(load_set("x", str(domain_dataset), "heldout", tok, 64, 100), EvalSet)


def _evals(values, general=None):
    return [
        {"eval/domain/ppl": v, **({"eval/general/ppl_vs_base": g} if g else {})}
        for v, g in zip(values, general or [None] * len(values), strict=True)
    ]


def test_stop_reason_plateau_and_forgetting():
    plateau = EarlyStopConfig(patience=2, min_delta=0.05)
    # best 70 after 3 evaluations; 69 and 68 are not 5% better: patience is used up at 68
    assert stop_reason(_evals([100, 80, 70, 69]), plateau) is None
    assert stop_reason(_evals([100, 80, 70, 69, 68]), plateau).startswith("plateau")
    assert stop_reason(_evals([100, 80, 70, 69, 60]), plateau) is None
    assert stop_reason(_evals([100, 80, 79]), plateau) is None
    forget = EarlyStopConfig(forgetting_budget=0.1)
    assert stop_reason(_evals([100, 90], [1.0, 1.09]), forget) is None
    assert "budget" in stop_reason(_evals([100, 90], [1.0, 1.11]), forget)
    assert stop_reason(_evals([100, 90], [1.0, 1.5]), EarlyStopConfig()) is None
    with pytest.raises(KeyError, match="not an evaluation metric"):
        stop_reason(_evals([1, 2]), EarlyStopConfig(patience=1, metric="eval/x/ppl"))


def test_config_demands_a_fresh_score_for_every_checkpoint(run_config, domain_dataset):
    from raycpt.config import ConfigError

    sets = [{"name": "d", "path": str(domain_dataset), "role": "domain"}]
    with pytest.raises(ConfigError, match="eval.every_steps .* to divide"):
        parse_config(
            run_config(eval={"sets": sets, "every_steps": 3}, checkpoint__score_metric="x")
        )
    with pytest.raises(ConfigError, match="need eval.sets"):
        parse_config(run_config(eval={"early_stop": {"patience": 2}}))
    with pytest.raises(ConfigError, match="role: general"):
        parse_config(run_config(eval={"sets": sets, "early_stop": {"forgetting_budget": 0.1}}))


def _eval_sets(domain_dataset, general_dataset):
    return [
        {"name": "dom", "path": str(domain_dataset), "role": "domain", "max_tokens": 1600},
        {"name": "gen", "path": str(general_dataset), "role": "general", "max_tokens": 1600},
    ]


@pytest.fixture(scope="module")
def scored_run(ray_cluster, tmp_path_factory, base_model_dir, domain_dataset, general_dataset):
    """2 workers, ZeRO-2, evaluation every 4 steps; checkpoints ranked by the *highest* domain
    perplexity, so that the best checkpoint is not simply the latest one."""
    cfg = parse_config(
        {
            "name": "scored",
            "storage_path": str(tmp_path_factory.mktemp("runs")),
            "model": {"path": str(base_model_dir)},
            "data": {"sources": [{"name": "domain", "path": str(domain_dataset)}], "seq_len": 64},
            "train": {
                "max_steps": 12,
                "micro_batch_size": 4,
                "global_batch_size": 8,
                "lr": 3e-3,
                "log_every": 4,
                "schedule": {"warmup_steps": 2},
            },
            "deepspeed": {"zero_stage": 2},
            "checkpoint": {
                "every_steps": 4,
                "num_to_keep": 1,
                "score_metric": "eval/domain/ppl",
                "score_order": "max",
            },
            "eval": {"sets": _eval_sets(domain_dataset, general_dataset), "every_steps": 4},
            "scaling": {"num_workers": 2},
        }
    )
    launch.run(cfg)
    run = launch.run_dir(cfg)
    return run, ckpt.read_meta(ckpt.fetch(ckpt.resolve(run)))


def test_sharded_in_loop_evaluation_equals_standalone(
    scored_run, base_model_dir, domain_dataset, general_dataset
):
    run, meta = scored_run
    evals = [h for h in meta["history"] if "eval/domain/ppl" in h]
    assert [e["step"] for e in evals] == [0, 4, 8, 12]
    base = evals[0]
    # step 0 is the base model: two workers' sharded evaluation = one process on the whole set
    for name, path in (("dom", domain_dataset), ("gen", general_dataset)):
        alone = evaluate_folder(str(base_model_dir), str(path), "heldout", 64, 1600)
        assert base[f"eval/set/{name}/ppl"] == pytest.approx(alone.perplexity, rel=1e-5)
        assert base[f"eval/set/{name}/ece"] == pytest.approx(alone.ece, abs=1e-6)
        assert base[f"eval/set/{name}/tokens"] == alone.tokens
    # the last evaluation is of the final weights: `raycpt eval` on the checkpoint agrees
    final = evaluate_folder(run, str(domain_dataset), "heldout", 64, 1600)
    assert evals[-1]["eval/domain/ppl"] == pytest.approx(final.perplexity, rel=1e-4)
    # gain vs forgetting, relative to the base model's own numbers
    assert evals[-1]["eval/domain/ppl_vs_base"] < 1.0
    assert evals[-1]["eval/domain/ppl_vs_base"] == pytest.approx(
        evals[-1]["eval/domain/ppl"] / base["eval/domain/ppl"]
    )
    assert meta["eval_base"]["eval/domain/ppl"] == base["eval/domain/ppl"]


def test_best_checkpoint_is_kept_and_found(scored_run):
    run, meta = scored_run
    scores = {h["step"]: h["eval/domain/ppl"] for h in meta["history"] if h["step"] % 4 == 0}
    scores.pop(0)
    best_step = max(scores, key=scores.get)
    kept = [step for step, _ in ckpt.list_checkpoints(run)]
    assert kept == sorted({best_step, 12})  # num_to_keep 1 keeps the best, plus the latest
    assert ckpt.resolve(run, best=True).endswith(ckpt.dir_name(best_step))
    assert ckpt.resolve(run).endswith(ckpt.dir_name(12))


def test_report_writes_html_and_real_pngs(scored_run, tmp_path):
    import matplotlib.image as mpimg

    from raycpt.cli import main

    run, _ = scored_run
    assert main(["report", run, "--out", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5
    assert "domain perplexity" in page
    for name in ("loss_lr", "perplexity", "calibration", "sources", "throughput"):
        img = mpimg.imread(tmp_path / f"{name}.png")
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert img.std() > 0.01  # something is drawn, not a blank canvas


def test_early_stop_on_a_plateau_and_no_rerun(
    ray_cluster, run_config, domain_dataset, general_dataset, capsys, tmp_path, monkeypatch
):
    from raycpt.cli import main

    # relative paths mean the launching process's folder, not Ray Train's worker folders
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(
        run_config(
            storage_path="runs",
            train__max_steps=40,
            train__log_every=2,
            checkpoint__every_steps=100,
            scaling__num_workers=1,
            eval={
                "sets": _eval_sets(domain_dataset, general_dataset),
                "every_steps": 2,
                # a 40% gain every 2 evaluations is more than this run can keep up
                "early_stop": {"patience": 2, "min_delta": 0.4},
            },
        )
    )
    launch.run(cfg)
    run = launch.run_dir(cfg)
    assert (tmp_path / "runs" / cfg.name).is_dir()
    meta = ckpt.read_meta(ckpt.fetch(ckpt.resolve(run)))
    assert meta["early_stop"].startswith("plateau")
    assert 4 <= meta["step"] < 40
    assert meta["history"][-1]["step"] == meta["step"]
    assert meta["history"][0]["step"] == 0 and "eval/domain/ppl" in meta["history"][0]
    # running the same config again resumes into the stopped state: no more training
    launch.run(cfg)
    again = ckpt.read_meta(ckpt.fetch(ckpt.resolve(run)))
    assert again["step"] == meta["step"]
    assert main(["eval", run, str(domain_dataset), "--seq-len", "64", "--max-tokens", "800"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ppl"] > 1 and 0 <= out["ece"] <= 1
