"""Exact data resume through real training runs: a run whose worker processes are killed
(SIGKILL, not a polite stop) restarts from its checkpoint and trains on exactly the documents of
an unbroken run; a run continued on fewer workers trains on every document exactly once; the
document log and `raycpt inspect` show what the model saw."""

import json
import os
import signal
import threading
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from raycpt import checkpoint as ckpt
from raycpt.cli import main
from raycpt.config import parse_config
from raycpt.inspect import describe
from raycpt.train import launch

pytestmark = pytest.mark.slow


def docs_of(cfg) -> list:
    folder = ckpt.fetch(ckpt.resolve(launch.run_dir(cfg)))
    return [tuple(d) for st in ckpt.read_data_states(folder) for d in st.get("docs", [])]


def kill_workers_after(cfg, step: int, killed: list) -> threading.Thread:
    """SIGKILL every training worker process once checkpoint `step` exists."""
    from ray.util.state import list_actors

    def run():
        target = os.path.join(launch.run_dir(cfg), ckpt.dir_name(step), ckpt.META)
        deadline = time.time() + 240
        while not os.path.exists(target) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.3)  # a few steps past the checkpoint
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
            if a.class_name == "RayTrainWorker" and a.pid:
                os.kill(a.pid, signal.SIGKILL)
                killed.append(a.pid)
        killed.append("checked")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_killed_workers_resume_with_the_same_documents_and_losses(ray_cluster, run_config):
    common = {
        "train__max_steps": 60,
        "train__log_every": 10,
        "checkpoint__every_steps": 20,
        "data__log_documents": True,
    }
    full = parse_config(run_config(name="unbroken", **common))
    launch.run(full)
    broken = parse_config(run_config(name="killed", **common))
    killed: list = []
    watcher = kill_workers_after(broken, 20, killed)
    launch.run(broken)
    watcher.join()
    assert killed, "no worker was killed"

    meta = ckpt.read_meta(ckpt.fetch(ckpt.resolve(launch.run_dir(broken))))
    assert meta["step"] == 60
    # restarted from a checkpoint taken before the kill (20, or 40 if the kill came late)
    assert len(meta["segments"]) == 2 and meta["segments"][1][0] in (20, 40)
    ids_full, ids_broken = docs_of(full), docs_of(broken)
    assert Counter(ids_broken) == Counter(ids_full)
    assert len(ids_full) > 50
    a = ckpt.read_meta(ckpt.fetch(ckpt.resolve(launch.run_dir(full))))["history"]
    for ha, hb in zip(a, meta["history"], strict=True):
        assert hb["loss"] == pytest.approx(ha["loss"], abs=1e-4)


def test_two_workers_then_one_trains_on_every_document_exactly_once(
    ray_cluster, run_config, domain_dataset, capsys
):
    common = {
        "data__on_exhausted": "stop",
        "data__log_documents": True,
        "train__schedule": {"warmup_steps": 2, "horizon_steps": 400},
        "checkpoint__every_steps": 5,
        "train__log_every": 5,
    }
    first = parse_config(run_config(name="shrink", train__max_steps=5, **common))
    launch.run(first)
    assert ckpt.read_meta(ckpt.fetch(ckpt.resolve(launch.run_dir(first))))["world_size"] == 2
    second = parse_config(
        run_config(name="shrink", train__max_steps=400, scaling__num_workers=1, **common)
    )
    launch.run(second)  # until the data runs out, on one worker (accumulation 1 -> 2)

    info = describe(launch.run_dir(second), documents=True)
    assert info["world_size"] == 1 and 5 < info["step"] < 400
    assert info["segments"][0] == [0, 5] and info["segments"][1][0] == 5
    ids = [d[0] for d in info["documents"]]
    expected = {
        i
        for f in (domain_dataset / "train").glob("*.parquet")
        for i in pq.read_table(f)["id"].to_pylist()
    }
    assert len(ids) == len(set(ids)), "a document was trained on twice"
    # With on_exhausted: stop, the tail that cannot fill a whole last step (8 x 64 tokens, i.e.
    # a few documents) is not trained on; nothing before it is skipped.
    assert set(ids) <= expected
    assert len(expected - set(ids)) <= 5, "a document was skipped"

    capsys.readouterr()  # drop what the run printed
    assert main(["inspect", launch.run_dir(second)]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out[out.index("{") :])
    assert shown["tokens_per_source"]["domain"] == info["step"] * 8 * 64
    assert shown["documents_logged"] == len(ids) and "documents" not in shown
    assert shown["config_hash"] == second.digest() and shown["manifests"]["domain"]["shards"]
