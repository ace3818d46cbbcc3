"""Nodes that go away, on the session's real Ray cluster.

Elastic training: Ray nodes join the cluster as separate raylet processes (`ray start
--address`), each offering one `trainer_slot`, the resource the run's workers ask for. Killing a
node's processes (SIGKILL, as when a spot VM is reclaimed) takes its worker with it; the run goes
on with one worker and grows back to two when a node joins again, always from the latest
checkpoint, with the same global batch and no document lost, skipped or repeated.

Draining: `raycpt drain`, the chart's preStop hook, run as a real command while a run trains,
makes the workers checkpoint and exit before the pod would be signalled.
"""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from itertools import groupby
from pathlib import Path

import psutil
import pytest
import ray
from conftest import CLUSTER_ENV, GCS_PORT, ray_cli
from support import wait_for
from test_faults import in_background
from test_loader import docs_of
from test_reshard import logged_docs

from raycpt import checkpoint as ckpt
from raycpt import drain
from raycpt.config import CPTConfig, parse_config
from raycpt.train import launch
from raycpt.train.loop import Worker

pytestmark = pytest.mark.slow
SLOT = "trainer_slot"
HOLD_AFTER = 10  # steps a group smaller than num_workers trains before it waits


class SlotNodes:
    """Ray nodes of this machine joined to the session's cluster, one `trainer_slot` each."""

    def __init__(self, log_dir):
        self.log_dir, self.procs = log_dir, []

    def alive(self) -> int:
        return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get(SLOT))

    def add(self) -> subprocess.Popen:
        before = self.alive()
        log = open(self.log_dir / f"node-{len(self.procs)}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                ray_cli(),
                "start",
                f"--address=127.0.0.1:{GCS_PORT}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                f'--resources={{"{SLOT}": 1}}',
                # a temp dir of its own: nodes sharing the head's would share its runtime-env
                # folder, whose agent cleanup then removes the head's job packages
                f"--temp-dir={tempfile.mkdtemp(prefix='raynode-', dir='/tmp')}",
                "--dashboard-agent-listen-port=0",
                "--metrics-export-port=0",
                "--disable-usage-stats",
                "--block",
            ],
            env={**os.environ, **CLUSTER_ENV},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: raylet and workers die together
        )
        self.procs.append(proc)
        wait_for(lambda: self.alive() == before + 1, timeout=60)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """The node vanishes at once, the way a reclaimed spot VM does: `ray start` with every
        process under it (raylet, its workers), found by ancestry since Ray starts some of them
        in sessions of their own."""
        before = self.alive()
        kill_tree(proc)
        wait_for(lambda: self.alive() == before - 1, timeout=90)

    def close(self) -> None:
        for proc in self.procs:
            kill_tree(proc)


def kill_tree(proc: subprocess.Popen) -> None:
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture
def slot_nodes(ray_cluster, tmp_path):
    nodes = SlotNodes(tmp_path)
    yield nodes
    nodes.close()
    wait_for(lambda: nodes.alive() == 0, timeout=90)


def loop_holding_when_small(config: dict) -> None:
    """The run's own worker loop, except that a group smaller than scaling.num_workers stops
    stepping HOLD_AFTER steps after its start (it has checkpointed there) until Ray Train
    replaces it, or the test gives up (a `release` file): the test then decides when capacity
    returns, however fast this machine trains."""
    cfg = CPTConfig.model_validate(config["cpt"])
    worker = Worker(cfg, config.get("start_from"), config.get("augment_app"))
    step, start = worker.train_step, worker.step
    release = os.path.join(cfg.storage_path, "release")

    def held_step(micro_batches):
        while (
            worker.world < cfg.scaling.num_workers
            and worker.step >= start + HOLD_AFTER
            and not os.path.exists(release)
        ):
            time.sleep(0.2)
        return step(micro_batches)

    worker.train_step = held_step
    if worker.preflight():
        worker.fit()


def checkpoint_meta(cfg, step: int) -> dict | None:
    folder = os.path.join(launch.run_dir(cfg), ckpt.dir_name(step))
    if not os.path.exists(os.path.join(folder, ckpt.META)):
        return None
    return ckpt.read_meta(folder)


def checkpoint_by(cfg, workers: int, after: int) -> int | None:
    """The step of the newest registered checkpoint past `after` saved by a group of
    `workers`, if any."""
    for step, _ in reversed(ckpt.list_checkpoints(launch.run_dir(cfg))):
        meta = checkpoint_meta(cfg, step)
        if step > after and meta and meta["world_size"] == workers:
            return step
    return None


def test_elastic_run_shrinks_on_node_loss_and_grows_back(
    ray_cluster, run_config, slot_nodes, monkeypatch
):
    monkeypatch.setattr(launch, "train_loop_per_worker", loop_holding_when_small)
    common = {
        "train__max_steps": 60,
        "train__log_every": 10,
        "checkpoint__every_steps": 10,
        "checkpoint__num_to_keep": None,
        "data__log_documents": True,
        "train__schedule": {"warmup_steps": 3, "min_lr_ratio": 0.1, "horizon_steps": 200},
    }
    cfg = parse_config(
        run_config(
            name="elastic",
            scaling={
                "num_workers": 2,
                "min_workers": 1,
                "resize_check_s": 1.0,
                "resources_per_worker": {SLOT: 1.0},
            },
            **common,
        )
    )
    first = slot_nodes.add()
    slot_nodes.add()
    events: dict = {}

    def orchestrate():
        try:
            # two workers are training, past step 20 (Ray's view of the cluster can lag the
            # nodes' start by ~20 s: the run may begin on one worker and grow to two first)
            wait_for(lambda: checkpoint_by(cfg, 2, after=19), timeout=300)
            events["killed_after"] = checkpoint_by(cfg, 2, after=19)
            slot_nodes.kill(first)  # a node is lost mid-run
            # the run goes on with one worker, which checkpoints and then waits (see above)
            wait_for(lambda: checkpoint_by(cfg, 1, after=events["killed_after"]), timeout=600)
            events["small_checkpoint"] = checkpoint_by(cfg, 1, after=events["killed_after"])
            slot_nodes.add()  # capacity comes back: Ray Train should replace the group
            wait_for(lambda: checkpoint_by(cfg, 2, after=events["small_checkpoint"]), 300)
        finally:  # never leave the run waiting on a test that has given up
            open(os.path.join(cfg.storage_path, "release"), "w").close()

    thread = in_background(orchestrate)
    result = launch.run(cfg)
    thread.join(timeout=10)
    assert events["killed_after"] and events["small_checkpoint"]

    meta = checkpoint_meta(cfg, 60)
    assert result.metrics["step"] == 60 and meta["world_size"] == 2
    history = [h for h in meta["history"] if "workers" in h]
    sizes = [h["workers"] for h in history]
    # two workers, then one (after the loss), then two again (after growing back)
    # two workers, then one (after the loss), then two again (after growing back); a first
    # one-worker stretch only when the run started before Ray saw the second node
    assert [size for size, _ in groupby(sizes)] in ([2, 1, 2], [1, 2, 1, 2])
    for h in history:  # the global batch never changed: accumulation absorbed the change
        assert h["workers"] * cfg.train.micro_batch_size * h["grad_accum"] == 8
    assert {h["grad_accum"] for h in history} == {1, 2}
    # the last segment started from the one-worker group's checkpoint
    assert meta["segments"][-1] == [events["small_checkpoint"], 60]

    # nothing forgotten, nothing trained on twice, as many tokens as an unbroken run
    final = docs_of(cfg)
    assert len(final) == len(set(final))
    for step in (events["killed_after"], events["small_checkpoint"]):
        folder = os.path.join(launch.run_dir(cfg), ckpt.dir_name(step))
        assert set(logged_docs(folder)) < set(final)
    unbroken = parse_config(run_config(name="not-elastic", **common))
    launch.run(unbroken)
    assert meta["tokens_per_source"] == checkpoint_meta(unbroken, 60)["tokens_per_source"]

    # and nothing skipped: carried on past the end of the first epoch, both runs have trained
    # on every document of epoch 0 exactly once
    for run in (cfg, unbroken):
        launch.run(
            run.model_copy(update={"train": run.train.model_copy(update={"max_steps": 200})})
        )
    epoch0 = [Counter(d for d, epoch in docs_of(run) if epoch == 0) for run in (cfg, unbroken)]
    assert epoch0[0] == epoch0[1] and set(epoch0[0].values()) == {1}
    assert all(any(epoch == 1 for _, epoch in docs_of(run)) for run in (cfg, unbroken))


def test_drain_checkpoints_the_run_and_waits_for_its_workers(ray_cluster, run_config):
    cfg = parse_config(
        run_config(
            name="drained",
            train__max_steps=400,
            train__log_every=10,
            checkpoint__every_steps=50,
        )
    )
    outcome: dict = {}

    def drain_while_training():
        wait_for(lambda: checkpoint_meta(cfg, 50), timeout=300)
        outcome["drain"] = subprocess.run(
            [str(Path(sys.executable).with_name("raycpt")), "drain", "--timeout", "120"],
            capture_output=True,
            text=True,
        )

    thread = in_background(drain_while_training)
    result = launch.run(cfg)
    thread.join(timeout=150)
    done = outcome["drain"]
    assert done.returncode == 0, done.stderr
    assert "SIGTERM sent to 2 training worker(s)" in done.stderr
    stopped_at = result.metrics["step"]
    assert result.metrics["preempted"] is True and 50 < stopped_at < 400
    assert ckpt.list_checkpoints(launch.run_dir(cfg))[-1][0] == stopped_at
    assert drain.train_workers() == []  # drain returned only once they had gone
