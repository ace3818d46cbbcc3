"""Faults a run handles itself, on the session's real Ray cluster with DeepSpeed ZeRO-2 on CPU:
storage that cannot be written and a forward pass that cannot run fail before training; a NaN
loss (injected by the documented failure.debug_nan_steps option) is skipped, rolled back or
stops the run, as configured; SIGTERM to one worker process checkpoints the run at the next
step and the next start resumes there without losing or repeating a document; a checkpoint
upload through a cut network path is retried and the run goes on, and one that cannot be written
stops the run with a clear error, the previous checkpoint resuming."""

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import free_port, wait_port
from support import wait_for
from test_loader import docs_of

from raycpt import checkpoint as ckpt
from raycpt.config import CPTConfig, parse_config
from raycpt.train import faults, launch
from raycpt.train.engine import ModelError
from raycpt.train.loop import Worker
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


def copy_checkpoint(folder: str, to: Path, step: int) -> str:
    dest = to / ckpt.dir_name(step)
    shutil.copytree(folder, dest)
    return str(dest)


@pytest.mark.slow
def test_a_checkpoint_counts_only_with_every_workers_part_whole(ray_cluster, run_config, tmp_path):
    """Completeness that needs no Ray snapshot: each worker's parts file lists its files and
    sizes and is uploaded after them. A copy missing a shard, with a shard cut short, or without
    a worker's parts file is refused by name; a run whose first save never registered (Ray's
    marker, no snapshot) has no checkpoint, and its leftover is removed before the next attempt
    saves, so a group of another size does not mix its part with the leftover's."""
    cfg = parse_config(run_config(name="parts", train__max_steps=4, checkpoint__every_steps=2))
    launch.run(cfg)
    run = launch.run_dir(cfg)
    folder = os.path.join(run, ckpt.dir_name(4))
    assert ckpt.incomplete(folder) is None
    parts = [
        json.load(open(os.path.join(folder, ckpt.PARTS, f"rank-{r:05d}.json")))["files"]
        for r in (0, 1)
    ]
    on_disk = {
        os.path.relpath(os.path.join(root, n), folder)
        for root, _, names in os.walk(folder)
        for n in names
    }
    sealed = {f"{ckpt.PARTS}/rank-0000{r}.json" for r in (0, 1)}
    assert set(parts[0]) | set(parts[1]) | sealed == on_disk
    shard = "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert shard in parts[1] and ckpt.META in parts[0] and "data/rank-00001.json" in parts[1]

    cases = {
        "missing": (lambda f: os.remove(os.path.join(f, shard)), f"{shard} (worker 1) is missing"),
        "cut": (
            lambda f: os.truncate(os.path.join(f, shard), 1000),
            f"{shard} (worker 1) has 1000 bytes of the {parts[1][shard]} written",
        ),
        "unsealed": (
            lambda f: os.remove(os.path.join(f, ckpt.PARTS, "rank-00001.json")),
            "worker 1's part never finished uploading",
        ),
    }
    for name, (damage, why) in cases.items():
        copy = copy_checkpoint(folder, tmp_path / name, 4)
        damage(copy)
        with pytest.raises(ckpt.CheckpointError, match="is not a complete checkpoint") as err:
            ckpt.resolve(copy)
        assert why in str(err.value)

    # a run folder copied without Ray's files: every whole folder counts, the cut one does not
    copied = tmp_path / "copied"
    shutil.copytree(run, copied, ignore=shutil.ignore_patterns(ckpt.RAY_SNAPSHOT, ckpt.RAY_MARKER))
    os.remove(os.path.join(copy_checkpoint(folder, copied, 6), shard))
    assert [s for s, _ in ckpt.list_checkpoints(str(copied))] == [2, 4, 6]
    assert ckpt.resolve(str(copied)).endswith(ckpt.dir_name(4))

    # the first save of a 2-worker run was cut before Ray registered it; the run starts again
    # on 1 worker
    again = parse_config(
        run_config(
            name="first-cut",
            scaling={"num_workers": 1},
            train__max_steps=2,
            checkpoint__every_steps=2,
        )
    )
    rerun = Path(launch.run_dir(again))
    rerun.mkdir(parents=True)
    (rerun / ckpt.RAY_MARKER).touch()
    copy_checkpoint(os.path.join(run, ckpt.dir_name(2)), rerun, 2)
    assert ckpt.list_checkpoints(str(rerun)) == []
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint under"):
        ckpt.resolve(str(rerun))
    launch.run(again)
    saved = rerun / ckpt.dir_name(2)
    assert ckpt.incomplete(str(saved)) is None and ckpt.read_meta(str(saved))["world_size"] == 1
    assert sorted(os.listdir(saved / "data")) == ["rank-00000.json"]  # no leftover of worker 1
    assert sorted(os.listdir(saved / ckpt.PARTS)) == ["rank-00000.json"]
    assert not (saved / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()


# ---------------------------------------------------------------------------------------------
# Storage faults on the write side: checkpoints on the loopback S3 server (moto, with auth)
# ---------------------------------------------------------------------------------------------

WRITE_FAULT_RUN = {
    "train__log_every": 2,
    "checkpoint__every_steps": 2,
    "checkpoint__num_to_keep": None,
    "data__log_documents": True,
}


def s3_root(s3_server) -> str:
    return f"s3://{s3_server['bucket']}/write-faults"


def start_proxy(port: int, s3_server) -> subprocess.Popen:
    """tests/tcp_proxy.py forwarding `port` to the S3 server; killing it cuts the path."""
    cmd = [sys.executable, str(Path(__file__).with_name("tcp_proxy.py")), str(port)]
    proc = subprocess.Popen([*cmd, "127.0.0.1", str(s3_server["port"])])
    wait_port(port)
    return proc


def cut_endpoint_once(s3_server, key: str, port: int, proxy: list, seconds: float):
    """Once `key` exists on the S3 server (asked directly, not through the proxy), kill the
    proxy (connections reset, then refused) and start it again `seconds` later."""
    import boto3

    direct = boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1")

    def run():
        deadline = time.time() + 240
        while time.time() < deadline:
            if direct.list_objects_v2(Bucket=s3_server["bucket"], Prefix=key).get("KeyCount"):
                break
            time.sleep(0.02)
        proxy[0].kill()
        proxy[0].wait()
        time.sleep(seconds)
        proxy.append(start_proxy(port, s3_server))

    return in_background(run)


def checkpoint_files(location: str) -> set[str]:
    """The files of a checkpoint, relative to its folder (the final one's probe left out)."""
    from raycpt import storage

    names = {loc[len(location) + 1 :] for loc, _ in storage.list_objects(location)}
    return names - {ckpt.PROBE}


@pytest.mark.slow
def test_a_network_cut_during_checkpoint_uploads_is_retried_and_the_run_goes_on(
    ray_cluster, s3_server, run_config, monkeypatch, record_property
):
    """The run's only path to S3 is cut for 2 s just after the step-2 checkpoint is stored, so
    the next upload runs into it: botocore's retries carry it over, the run finishes without a
    restart, the retries show in the metrics, and every checkpoint is complete."""
    from raycpt import storage

    port = free_port()
    proxy = [start_proxy(port, s3_server)]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")  # driver and workers
    storage._S3.reset()
    cfg = parse_config(
        run_config(
            name="cut", storage_path=s3_root(s3_server), train__max_steps=12, **WRITE_FAULT_RUN
        )
    )
    try:
        key = f"write-faults/cut/{ckpt.dir_name(2)}/{ckpt.META}"
        watcher = cut_endpoint_once(s3_server, key, port, proxy, seconds=2.0)
        result = launch.run(cfg)
        watcher.join()
    finally:
        for p in proxy:
            p.kill()
        monkeypatch.undo()
        storage._S3.reset()
    assert len(proxy) == 2, "the endpoint was not cut"
    meta = latest_meta(cfg)
    assert result.metrics["step"] == 12 and meta["segments"] == [[0, 12]]  # no restart
    retries = sum(h.get("ckpt/upload_retries", 0) for h in meta["history"])
    record_property("upload_retries", retries)  # for RELIABILITY.md (--junitxml)
    assert retries > 0
    checkpoints = ckpt.list_checkpoints(launch.run_dir(cfg))
    assert [s for s, _ in checkpoints] == [2, 4, 6, 8, 10, 12]
    first = checkpoint_files(checkpoints[0][1])
    assert {"data/rank-00000.json", "data/rank-00001.json", ckpt.META} <= first
    assert {f"{ckpt.PARTS}/rank-00000.json", f"{ckpt.PARTS}/rank-00001.json"} <= first
    for step, location in checkpoints:
        assert checkpoint_files(location) == first, f"checkpoint {step} is incomplete"
        assert ckpt.incomplete(location) is None
        assert ckpt.read_meta(ckpt.fetch(location))["step"] == step


def train_workers_started() -> int:
    """Ray Train worker actors this Ray cluster has started, alive or dead."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10000)
    return len(actors)


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_the_previous_one_resumes(
    ray_cluster, s3_server, run_config, record_property
):
    """An IAM policy denies writing worker 1's optimizer shard of checkpoint 4 (a permanent
    fault: AccessDenied is not retried). The run stops at once with one error naming the step,
    the object and the cause, without FailureConfig restarts; worker 0's part of checkpoint 4 is
    removed, checkpoint 2 stays the latest, and the next start resumes there and finishes with
    the documents of an undisturbed run."""
    import boto3

    from raycpt import storage

    common = {**WRITE_FAULT_RUN, "train__max_steps": 6, "failure": {"max_failures": 3}}
    cfg = parse_config(run_config(name="denied", storage_path=s3_root(s3_server), **common))
    run = launch.run_dir(cfg)
    shard = f"{run}/{ckpt.dir_name(4)}/ds/zero_pp_rank_1_".removeprefix("s3://")
    deny = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Deny", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{shard}*"}
        ],
    }
    iam = boto3.client("iam", endpoint_url=s3_server["endpoint"], region_name="us-east-1")
    iam.put_user_policy(UserName="raycpt", PolicyName="deny", PolicyDocument=json.dumps(deny))
    started = train_workers_started()
    try:
        with pytest.raises(faults.RunStopped) as stopped:
            launch.run(cfg)
    finally:
        iam.delete_user_policy(UserName="raycpt", PolicyName="deny")
    message = str(stopped.value)
    record_property("stop_message", message)  # for RELIABILITY.md (--junitxml)
    assert f"checkpoint {ckpt.dir_name(4)} (step 4) could not be written to {run}/" in message
    assert f"worker 1: s3://{shard}mp_rank_00_optim_states.pt: access denied" in message
    assert "(AccessDenied)" in message
    assert f"the latest restorable checkpoint is {ckpt.dir_name(2)} ({run}/" in message
    assert train_workers_started() - started == 2  # one attempt: no restart re-trained steps
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert storage.list_objects(f"{run}/{ckpt.dir_name(4)}") == []  # worker 0's part removed

    launch.run(cfg)  # the storage is fixed: the next start resumes from checkpoint 2
    meta = latest_meta(cfg)
    assert meta["step"] == 6 and meta["segments"] == [[0, 2], [2, 6]]
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 4, 6]
    unbroken = parse_config(run_config(name="not-denied", **common))
    launch.run(unbroken)
    assert Counter(docs_of(cfg)) == Counter(docs_of(unbroken))


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 MiB file system (tmpfs; mounting needs root, as on CI and this machine)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs for the disk-full test: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def filled_flag(cfg) -> Path:
    """Beside the small disk's mount point (the flag must be writable once the disk is full)."""
    return Path(cfg.storage_path).parent.parent / "disk-filled"


def loop_pausing_after_first_checkpoint(config: dict) -> str | None:
    """The run's own worker loop, except that it waits after its step-2 checkpoint until the
    test has filled the disk: the disk then fills while nothing writes to it (not Ray Train's
    own bookkeeping either), so the next checkpoint's upload is what meets the full disk."""
    cfg = CPTConfig.model_validate(config["cpt"])
    worker = Worker(cfg, config.get("start_from"), config.get("augment_app"))
    step = worker.train_step

    def paused_step(micro_batches):
        while worker.step >= 2 and not filled_flag(cfg).exists():
            time.sleep(0.1)
        return step(micro_batches)

    worker.train_step = paused_step
    if worker.preflight():
        worker.fit()
    return worker.stopped


def fill_disk_after(cfg, step: int, mount: Path, filled: dict) -> threading.Thread:
    """Fill the disk to the last byte once checkpoint `step` is registered, then raise the
    flag that lets the run go on."""

    def registered() -> bool:
        # Ray Train's snapshot, not list_checkpoints: before Ray writes its first snapshot that
        # lists every uploaded folder, and the disk would then fill while Ray writes it
        try:
            names = ckpt.registered_checkpoints(launch.run_dir(cfg))
        except ValueError:  # read while Ray rewrites it
            return False
        return ckpt.dir_name(step) in (names or ())

    def run():
        try:
            wait_for(registered, 240)
            with open(mount / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
                except OSError as err:
                    filled["errno"] = err.errno
        finally:  # never leave the run waiting on a test that has given up
            filled_flag(cfg).touch()

    return in_background(run)


@pytest.mark.slow
def test_a_disk_that_fills_stops_the_run_and_the_previous_checkpoint_resumes(
    ray_cluster, run_config, small_disk, monkeypatch
):
    """The storage path's disk fills up after checkpoint 2 (ENOSPC from the kernel): the run
    stops with an error that names the disk, the half-written checkpoint is removed, and once
    space is freed the next start resumes from checkpoint 2."""
    common = {**WRITE_FAULT_RUN, "train__max_steps": 40}
    cfg = parse_config(run_config(name="full", storage_path=str(small_disk / "runs"), **common))
    monkeypatch.setattr(launch, "train_loop_per_worker", loop_pausing_after_first_checkpoint)
    filled: dict = {}
    watcher = fill_disk_after(cfg, 2, small_disk, filled)
    with pytest.raises(faults.RunStopped) as stopped:
        launch.run(cfg)
    watcher.join(timeout=10)
    assert filled.get("errno") == errno.ENOSPC
    message = str(stopped.value)
    assert "No space left on device" in message and "the disk is full" in message
    run = launch.run_dir(cfg)
    steps = [s for s, _ in ckpt.list_checkpoints(run)]
    assert steps[0] == 2 and steps[-1] < 40  # stopped before the end; the saved ones intact
    assert f"the latest restorable checkpoint is {ckpt.dir_name(steps[-1])}" in message
    for step, folder in ckpt.step_folders(run):  # the failed save left no file behind
        if step > steps[-1]:
            assert not [p for p in Path(folder).rglob("*") if p.is_file()]

    os.unlink(small_disk / "filler")  # space freed: the next start resumes
    launch.run(cfg)
    meta = latest_meta(cfg)
    assert meta["step"] == 40 and meta["segments"][-1] == [steps[-1], 40]
