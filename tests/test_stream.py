"""The data plane without Ray: global order, exact resume, re-partitioning, shard verification,
and token shares of the mixer."""

import json
from collections import Counter

import numpy as np
import pytest
from transformers import AutoTokenizer

from raycpt.config import DataConfig, SourceConfig, WeightPoint
from raycpt.loader import CPTDataLoader, DataExhausted, Layout
from raycpt.mix import MixSchedule, SlotMixer
from raycpt.stream import ShardError, UnitOrder


def data_cfg(path, **kw) -> DataConfig:
    return DataConfig(sources=[SourceConfig(name="d", path=str(path))], seq_len=32, **kw)


def loaders(cfg, tok, world, resume=None, grad_accum=2, record=True):
    return [
        CPTDataLoader(
            cfg,
            tok,
            seed=7,
            layout=Layout(rank, world, 2, grad_accum),
            total_steps=100,
            resume=resume,
            record_documents=record,
        )
        for rank in range(world)
    ]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_unit_order_visits_every_shard_once_per_epoch():
    order = UnitOrder("s", (5, 6, 7, 8), seed=3)
    for epoch in range(3):
        shards = [order.unit(epoch * 4 + k)[1] for k in range(4)]
        assert sorted(shards) == [0, 1, 2, 3]
    assert [order.unit(k) for k in range(8)] != [(k // 4, k % 4) for k in range(8)]
    assert sorted(order.rows(5)) == list(range(order.shard_rows[order.unit(5)[1]]))
    assert UnitOrder("s", (5, 6, 7, 8), seed=3).rows(5).tolist() == order.rows(5).tolist()
    assert not UnitOrder("s", (5, 6), seed=3, num_epochs=1).exists(2)


def take_steps(lds, n):
    out = []
    for _ in range(n):
        out.append([ld.next_step() for ld in lds])
    return out


def test_same_seed_same_batches_and_exact_resume(domain_dataset, tok):
    cfg = data_cfg(domain_dataset)
    a = loaders(cfg, tok, 2, record=False)
    b = loaders(cfg, tok, 2, record=False)
    steps_a = take_steps(a, 6)
    steps_b = take_steps(b, 6)
    for sa, sb in zip(steps_a, steps_b, strict=True):
        for ra, rb in zip(sa, sb, strict=True):
            assert all(
                np.array_equal(x, y)
                for x, y in zip(ra.micro_batches, rb.micro_batches, strict=False)
            )
    # the two workers see different data
    assert not np.array_equal(steps_a[0][0].micro_batches[0], steps_a[0][1].micro_batches[0])
    # resume from the state after step 3: the next three steps are identical
    resumed = loaders(cfg, tok, 2, resume=[r.state for r in steps_a[2]], record=False)
    for sa, sr in zip(steps_a[3:], take_steps(resumed, 3), strict=True):
        for ra, rr in zip(sa, sr, strict=True):
            assert all(
                np.array_equal(x, y)
                for x, y in zip(ra.micro_batches, rr.micro_batches, strict=False)
            )
    for ld in a + b + resumed:
        ld.close()


def drain(lds, max_steps=10_000):
    """Run loaders until any is exhausted; return consumed (doc id, epoch) over all workers."""
    states = None
    for _ in range(max_steps):
        try:
            states = [ld.next_step().state for ld in lds]
        except DataExhausted:
            break
    consumed = [c for ld in lds for s in ld.streams for c in s.consumed]
    for ld in lds:
        ld.close()
    return consumed, states


def all_ids(dataset):
    import pyarrow.parquet as pq

    return {
        i for f in (dataset / "train").glob("*.parquet") for i in pq.read_table(f)["id"].to_pylist()
    }


def test_repartition_two_workers_to_one_loses_and_repeats_nothing(domain_dataset, tok):
    cfg = data_cfg(domain_dataset, on_exhausted="stop")
    two = loaders(cfg, tok, 2, record=False)
    states = [r.state for r in take_steps(two, 5)[-1]]
    for ld in two:
        ld.close()
    rest, _ = drain(loaders(cfg, tok, 1, resume=states))
    ids = [i for i, _ in consumed_in_steps(cfg, tok, 2, 5) + rest]
    assert len(ids) == len(set(ids)), "a document was trained on twice"
    assert set(ids) == all_ids(domain_dataset), "a document was skipped"


def consumed_in_steps(cfg, tok, world, n_steps):
    """Documents started by `world` workers in exactly `n_steps` steps, driven without the
    loader's read-ahead thread (which runs past the step a state describes)."""
    from raycpt.loader import build_orders
    from raycpt.pack import SourceStream, make_encoder
    from raycpt.stream import Cursor, UnitReader

    orders, splits = build_orders(cfg, 7)
    out = []
    for rank in range(world):
        lay = Layout(rank, world, 2, 2)
        reader = UnitReader(cfg.sources[0].path, splits[0], orders[0], make_encoder(tok))
        stream = SourceStream(orders[0], reader, cfg.seq_len, Cursor.fresh(rank, world))
        stream.consumed = []
        for _ in range(n_steps * lay.grad_accum * lay.micro_batch):
            stream.next_block()
        out.extend(stream.consumed)
        reader.close()
    return out


def test_corrupted_shard_is_detected_and_named(domain_dataset, tok, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(domain_dataset, copy)
    shard = sorted((copy / "train").glob("*.parquet"))[3]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    ld = CPTDataLoader(data_cfg(copy, shuffle=False), tok, 0, Layout(0, 1, 2, 8), 100)
    with pytest.raises(ShardError, match=rf"{shard.name} does not match its manifest"):
        for _ in range(50):
            ld.next_step()
    ld.close()


def test_mixer_honours_shares_over_every_window():
    sources = [
        SourceConfig(name=n, path="/x", weight=w)
        for n, w in [("domain", 0.8), ("adjacent", 0.15), ("replay", 0.05)]
    ]
    mixer = SlotMixer(MixSchedule(sources), total_slots=10_000)
    slots = mixer.take(4000)
    window = 200
    for start in range(0, 4000 - window, 50):
        counts = Counter(slots[start : start + window])
        for idx, w in enumerate([0.8, 0.15, 0.05]):
            assert abs(counts[idx] / window - w) <= 2 / window + 1e-9


def test_mixer_schedule_moves_shares_and_resumes_exactly():
    sources = [
        SourceConfig(name="domain", path="/x", weight=1.0),
        SourceConfig(
            name="replay",
            path="/y",
            schedule=[WeightPoint(at=0.0, weight=0.0), WeightPoint(at=1.0, weight=1.0)],
        ),
    ]
    mixer = SlotMixer(MixSchedule(sources), total_slots=1000)
    slots = mixer.take(1000)
    early, late = slots[:100].count(1) / 100, slots[-100:].count(1) / 100
    assert early < 0.1 and 0.45 < late < 0.55  # replay weight 0 -> 1 against domain 1
    a = SlotMixer(MixSchedule(sources), 1000)
    a.take(300)
    b = SlotMixer(MixSchedule(sources), 1000)
    b.load_state_dict(a.state_dict())
    assert a.take(200) == b.take(200)


def prepared(tmp_path, docs: list[dict], **cfg):
    import json

    from raycpt.config import PrepareConfig
    from raycpt.prepare import prepare

    raw = tmp_path / "raw" / "d.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "prepared"
    prepare(PrepareConfig(inputs=[str(raw.parent)], output=str(out), min_shards=8, **cfg))
    return out


def drain_ids(ld):
    from support import drain_loader

    return [i for i, _ in drain_loader(ld)]


def test_curriculum_goes_from_easy_to_hard_with_bounded_randomness(tmp_path, tok):
    from support import synthetic_docs

    docs = [{"text": t} for t in synthetic_docs(240, seed=8, min_words=10, max_words=200)]
    out = prepared(tmp_path, docs, difficulty="length")
    import pyarrow.parquet as pq

    shards = sorted((out / "train").glob("*.parquet"))
    spans = [
        (min(t["n_chars"].to_pylist()), max(t["n_chars"].to_pylist()))
        for t in map(pq.read_table, shards)
    ]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # shards easiest first
    length = {r["id"]: r["n_chars"] for f in shards for r in pq.read_table(f).to_pylist()}

    def order(randomness):
        cfg = data_cfg(
            out, on_exhausted="stop", curriculum={"enabled": True, "randomness": randomness}
        )
        ld = CPTDataLoader(cfg, tok, 7, Layout(0, 1, 2, 1), 1000, record_documents=True)
        return [length[i] for i in drain_ids(ld)]

    strict = order(0.0)
    assert strict == sorted(strict) and len(strict) > 200
    noisy = order(0.3)
    assert noisy != sorted(noisy)
    ranks = np.argsort(np.argsort(noisy))
    assert np.corrcoef(ranks, np.arange(len(noisy)))[0, 1] > 0.7  # still easy -> hard

    with pytest.raises(Exception, match="prepared without a difficulty score"):
        CPTDataLoader(
            data_cfg(domain_dataset_path(tmp_path, tok), curriculum={"enabled": True}),
            tok,
            7,
            Layout(0, 1, 2, 1),
            10,
        )


def domain_dataset_path(tmp_path, tok):
    from support import synthetic_docs

    return prepared(tmp_path / "plain", [{"text": t} for t in synthetic_docs(40)])


def test_rarity_scores_rare_vocabulary_as_harder(tmp_path):
    import pyarrow.parquet as pq

    common = [{"text": "the patient was given the dose and the nurse recorded it " * 3}] * 1
    docs = (
        [
            {"text": f"the patient was given the dose number {i} and the nurse recorded it"}
            for i in range(60)
        ]
        + [{"text": "pheochromocytoma paraganglioma catecholamine metanephrine adrenalectomy"}]
        + common
    )
    out = prepared(tmp_path, docs, difficulty="rarity")
    rows = [
        r for f in sorted((out / "train").glob("*.parquet")) for r in pq.read_table(f).to_pylist()
    ]
    assert rows[-1]["text"].startswith("pheochromocytoma")  # the hardest comes last
    assert [r["difficulty"] for r in rows] == sorted(r["difficulty"] for r in rows)


def test_group_weights_up_and_down_weight_sub_populations(tmp_path, tok):
    from support import synthetic_docs

    texts = synthetic_docs(300, seed=12)
    docs = [{"text": t, "unit": "rare" if i % 10 == 0 else "common"} for i, t in enumerate(texts)]
    out = prepared(tmp_path, docs, group_field="unit")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["groups"] == {"common": 270, "rare": 30}
    cfg = DataConfig(
        sources=[SourceConfig(name="d", path=str(out), group_weights={"rare": 3.0, "common": 0.5})],
        seq_len=32,
        on_exhausted="stop",
    )
    ld = CPTDataLoader(cfg, tok, 7, Layout(0, 1, 2, 1), 10_000, record_documents=True)
    ids = drain_ids(ld)
    rare_ids = {d for d in ids if "#" in d}
    assert len(rare_ids) > 40  # copies of the rare group (2 extra copies of each)
    base = [i.split("#")[0] for i in ids]
    counts = ld.counters()
    assert counts["group/rare/docs"] == 90  # 30 documents x 3
    assert 100 < counts["group/common/docs"] < 170  # ~ 270 x 0.5
    assert len(set(base)) < 300  # about half of the common group left out this epoch
