"""Faults a run handles itself, on the session's real Ray cluster with DeepSpeed ZeRO-2 on CPU:
storage that cannot be written and a forward pass that cannot run fail before training; a NaN
loss (injected by the documented failure.debug_nan_steps option) is skipped, rolled back or
stops the run, as configured; SIGTERM to one worker process checkpoints the run at the next
step and the next start resumes there without losing or repeating a document."""

import hashlib
import logging
import math
import os
import shutil
import signal
import threading
import time
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_loader import docs_of

from raycpt import checkpoint as ckpt
from raycpt.config import parse_config
from raycpt.train import faults, launch
from raycpt.train.engine import ModelError
from raycpt.train.schedule import lr_multiplier


def latest_meta(cfg) -> dict:
    return ckpt.read_meta(ckpt.fetch(ckpt.resolve(launch.run_dir(cfg))))


# ---------------------------------------------------------------------------------------------
# Before training
# ---------------------------------------------------------------------------------------------


def test_unwritable_local_storage_fails_before_training(run_config, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = parse_config(run_config(name="nowhere", storage_path=str(blocker / "runs")))
    with pytest.raises(faults.PreflightError, match=r"storage_path .*a-file/runs is not usable"):
        launch.build_trainer(cfg)
    assert blocker.read_text() == "not a folder"


def test_missing_bucket_fails_before_training_and_a_good_probe_leaves_nothing(
    s3_server, run_config
):
    cfg = parse_config(run_config(name="s3", storage_path="s3://no-such-bucket-raycpt/runs"))
    with pytest.raises(faults.PreflightError, match="the bucket does not exist"):
        launch.build_trainer(cfg)
    from raycpt import storage

    good = f"s3://{s3_server['bucket']}/probe-runs"
    faults.probe_storage(good)
    assert storage.list_objects(good) == []


def test_dry_run_step_names_the_shapes_and_leaves_no_gradients(base_model_dir):
    """The pre-flight step on a real model: a sequence longer than GPT-2's learned positions
    fails with a message naming the settings; a good one accumulates no gradient."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=300, n_positions=16, n_embd=32, n_layer=1, n_head=4)
    )
    error = faults.dry_run_step(types.SimpleNamespace(module=gpt2), 2, 64, 300, torch.device("cpu"))
    assert "train.micro_batch_size 2 x data.seq_len 64" in error and "IndexError" in error

    llama = AutoModelForCausalLM.from_pretrained(base_model_dir)
    before = torch.random.get_rng_state()
    assert (
        faults.dry_run_step(types.SimpleNamespace(module=llama), 2, 64, 300, torch.device("cpu"))
        is None
    )
    assert all(p.grad is None for p in llama.parameters())
    assert torch.equal(torch.random.get_rng_state(), before)


def tree_hashes(*folders) -> dict:
    return {
        str(f): hashlib.sha256(f.read_bytes()).hexdigest()
        for folder in folders
        for f in sorted(Path(folder).rglob("*"))
        if f.is_file()
    }


def test_a_model_that_is_not_a_causal_lm_is_refused(run_config, tokenizer_dir, tmp_path):
    from transformers import T5Config

    folder = tmp_path / "t5"
    T5Config(vocab_size=400, d_model=32, d_ff=64, num_layers=1, num_heads=2).save_pretrained(folder)
    shutil.copytree(tokenizer_dir, folder, dirs_exist_ok=True)
    before = tree_hashes(folder)
    cfg = parse_config(run_config(name="t5", model={"path": str(folder)}))
    with pytest.raises(ModelError, match="a 't5' model is not a causal language model"):
        launch.build_trainer(cfg)
    assert tree_hashes(folder) == before


def test_a_missing_or_truncated_shard_is_refused_before_training(
    run_config, domain_dataset, tmp_path
):
    data = tmp_path / "data"
    shutil.copytree(domain_dataset, data)
    shards = sorted((data / "train").glob("*.parquet"))
    before = tree_hashes(data)
    shards[3].unlink()
    cfg = parse_config(run_config(name="gap", data__sources=[{"name": "d", "path": str(data)}]))
    with pytest.raises(faults.PreflightError, match=f"{shards[3].name} is listed in the manifest"):
        launch.build_trainer(cfg)
    shutil.copy(domain_dataset / "train" / shards[3].name, shards[3])
    shards[5].write_bytes(shards[5].read_bytes()[:-10])
    with pytest.raises(
        faults.PreflightError, match=f"{shards[5].name} has .* altered or truncated"
    ):
        launch.build_trainer(cfg)
    assert {k: v for k, v in tree_hashes(data).items() if shards[5].name not in k} == {
        k: v for k, v in before.items() if shards[5].name not in k
    }
    assert not (tmp_path / "runs" / "gap").exists()


def test_trust_remote_code_warns_loudly_on_the_driver(run_config, caplog):
    cfg = parse_config(run_config(name="remote", model__trust_remote_code=True))
    with caplog.at_level(logging.WARNING, logger="raycpt.train.launch"):
        launch.preflight(cfg)
    assert "trust_remote_code is ON" in caplog.text and "execute Python code" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raycpt.train.launch"):
        launch.preflight(parse_config(run_config(name="local")))
    assert "trust_remote_code" not in caplog.text


# ---------------------------------------------------------------------------------------------
# Non-finite steps (2 workers; only worker 0's loss is poisoned, so they must agree)
# ---------------------------------------------------------------------------------------------

NAN_RUN = {
    "train__max_steps": 8,
    "train__log_every": 2,
    "checkpoint__every_steps": 4,
    "train__schedule": {"warmup_steps": 2, "horizon_steps": 8},
}


def test_skip_without_a_zero_optimizer_is_a_config_error(run_config):
    from raycpt.config import ConfigError

    with pytest.raises(ConfigError, match="on_nan: skip relies on DeepSpeed's ZeRO optimizer"):
        parse_config(run_config(deepspeed__zero_stage=0, failure={"on_nan": "skip"}))
    parse_config(run_config(deepspeed__zero_stage=0, failure={"on_nan": "rollback"}))


def scheduled_lr(cfg, after_steps: int) -> float:
    """The LR after `after_steps` scheduler steps of an undisturbed run (the real schedule)."""
    return cfg.train.lr * lr_multiplier(cfg.train.schedule, cfg.horizon_steps)(after_steps)


@pytest.mark.slow
def test_nan_step_is_skipped_without_applying_it(ray_cluster, run_config):
    cfg = parse_config(
        run_config(
            name="skip",
            failure={"on_nan": "skip", "debug_nan_steps": [3]},
            **{**NAN_RUN, "train__log_every": 1},
        )
    )
    launch.run(cfg)
    meta = latest_meta(cfg)
    assert meta["step"] == 8 and meta["segments"] == [[0, 8]]
    last = meta["history"][-1]
    assert last["nonfinite/skipped"] == 1 and last["nonfinite/rollbacks"] == 0
    # the weights were not poisoned: every later step trains on finite losses
    assert all(math.isfinite(h["loss"]) for h in meta["history"] if h["step"] != 3)
    # DeepSpeed discarded step 3 (its overflow path): the LR schedule did not advance there
    lrs = {h["step"]: h["lr"] for h in meta["history"]}
    assert lrs[2] == pytest.approx(scheduled_lr(cfg, 2)) and lrs[3] == lrs[2]
    assert lrs[8] == pytest.approx(scheduled_lr(cfg, 7), rel=1e-9)


@pytest.mark.slow
def test_nan_step_rolls_back_to_the_checkpoint_with_a_lower_lr(ray_cluster, run_config):
    cfg = parse_config(
        run_config(
            name="rollback",
            failure={"on_nan": "rollback", "debug_nan_steps": [6], "rollback_lr_factor": 0.5},
            **NAN_RUN,
        )
    )
    launch.run(cfg)
    meta = latest_meta(cfg)
    assert meta["step"] == 8
    assert meta["segments"] == [[0, 4], [4, 8]]  # steps 5-6 were thrown away
    last = meta["history"][-1]
    assert last["nonfinite/rollbacks"] == 1 and math.isfinite(last["loss"])
    assert last["lr"] == pytest.approx(0.5 * scheduled_lr(cfg, 8), rel=1e-9)
    assert [s for s, _ in ckpt.list_checkpoints(launch.run_dir(cfg))] == [4, 8]


@pytest.mark.slow
def test_nan_step_with_on_nan_stop_ends_the_run_with_a_clear_error(ray_cluster, run_config):
    cfg = parse_config(
        run_config(name="stop", failure={"on_nan": "stop", "debug_nan_steps": [6]}, **NAN_RUN)
    )
    with pytest.raises(
        faults.RunStopped, match=r"non-finite loss or gradient norm at step 6 \(failure.on_nan"
    ):
        launch.run(cfg)
    # nothing after the last good checkpoint was saved
    assert [s for s, _ in ckpt.list_checkpoints(launch.run_dir(cfg))] == [4]


# ---------------------------------------------------------------------------------------------
# Pre-emption
# ---------------------------------------------------------------------------------------------


def train_worker_pids() -> list[int]:
    """Process ids of the live Ray Train workers, from Ray's state API."""
    from ray.util.state import list_actors

    alive = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return [a.pid for a in alive if a.class_name == "RayTrainWorker" and a.pid]


def in_background(fn) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def sigterm_one_worker_after(cfg, step: int, sent: list) -> threading.Thread:
    """SIGTERM one training worker process once checkpoint `step` exists (while training)."""

    def run():
        target = os.path.join(launch.run_dir(cfg), ckpt.dir_name(step), ckpt.META)
        deadline = time.time() + 240
        while not os.path.exists(target) and time.time() < deadline:
            time.sleep(0.1)
        pid = train_worker_pids()[0]
        os.kill(pid, signal.SIGTERM)
        sent.append(pid)

    return in_background(run)


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_and_the_next_start_resumes(
    ray_cluster, run_config, record_property
):
    common = {
        "train__max_steps": 100,
        "train__log_every": 10,
        "checkpoint__every_steps": 20,
        "data__log_documents": True,
    }
    cfg = parse_config(run_config(name="preempted", **common))
    sent: list = []
    watcher = sigterm_one_worker_after(cfg, 20, sent)
    result = launch.run(cfg)
    watcher.join()
    assert sent, "no worker got SIGTERM"
    stopped_at = result.metrics["step"]
    record_property("preempted_at_step", stopped_at)  # for RELIABILITY.md (--junitxml)
    assert result.metrics["preempted"] is True and 20 < stopped_at < 100
    steps = [s for s, _ in ckpt.list_checkpoints(launch.run_dir(cfg))]
    assert steps[-1] == stopped_at  # the pre-emption checkpoint, taken at the next step
    assert latest_meta(cfg)["segments"] == [[0, stopped_at]]

    launch.run(cfg)  # the next start resumes from it
    meta = latest_meta(cfg)
    assert meta["step"] == 100 and meta["segments"] == [[0, stopped_at], [stopped_at, 100]]
    assert meta["history"][-1]["preempted"] is False

    unbroken = parse_config(run_config(name="not-preempted", **common))
    launch.run(unbroken)
    assert Counter(docs_of(cfg)) == Counter(docs_of(unbroken))
    ref = {h["step"]: h["loss"] for h in latest_meta(unbroken)["history"]}
    assert meta["history"][-1]["loss"] == pytest.approx(ref[100], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Atomic checkpoints
# ---------------------------------------------------------------------------------------------


def kill_workers_during_save(cfg, step: int, seen: dict) -> threading.Thread:
    """SIGKILL every training worker the moment checkpoint `step`'s folder appears in storage
    (its upload has begun), recording whether Ray Train had registered it by then."""

    def run():
        folder = os.path.join(launch.run_dir(cfg), ckpt.dir_name(step))
        pids: list = []
        deadline = time.time() + 240
        while time.time() < deadline:
            if len(pids) < 2:  # the pids are known beforehand: the kill must be immediate
                pids = train_worker_pids()
            elif os.path.isdir(folder):
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                registered = ckpt.registered_checkpoints(launch.run_dir(cfg)) or set()
                seen.update(killed=pids, registered=ckpt.dir_name(step) in registered)
                return
            time.sleep(0.002)

    return in_background(run)


@pytest.mark.slow
def test_kill_during_save_resumes_from_the_previous_checkpoint(
    ray_cluster, run_config, record_property
):
    common = {
        "train__max_steps": 60,
        "train__log_every": 10,
        "checkpoint__every_steps": 20,
        "checkpoint__num_to_keep": None,
        "data__log_documents": True,
    }
    cfg = parse_config(run_config(name="killed-saving", **common))
    seen: dict = {}
    watcher = kill_workers_during_save(cfg, 40, seen)
    launch.run(cfg)
    watcher.join()
    assert seen.get("killed"), "no worker was killed"
    record_property("registered_when_killed", seen["registered"])  # for RELIABILITY.md
    meta = latest_meta(cfg)
    assert meta["step"] == 60 and len(meta["segments"]) == 2
    # the restart used the newest checkpoint Ray Train had registered when the save was cut
    assert meta["segments"][1][0] == (40 if seen["registered"] else 20)
    run = launch.run_dir(cfg)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [20, 40, 60]
    unbroken = parse_config(run_config(name="saved-in-peace", **common))
    launch.run(unbroken)
    assert Counter(docs_of(cfg)) == Counter(docs_of(unbroken))  # nothing lost or repeated

    # a leftover that looks complete but that Ray never registered is not taken for the latest
    leftover = os.path.join(run, ckpt.dir_name(80))
    shutil.copytree(os.path.join(run, ckpt.dir_name(60)), leftover)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [20, 40, 60]
    assert ckpt.resolve(run).endswith(ckpt.dir_name(60))
