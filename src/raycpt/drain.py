"""`raycpt drain`: hand a node's pre-emption notice to its training workers, and wait for them.

Kubernetes stops a pod by sending SIGTERM to the container's main process, here `ray start
--block`, which then takes the raylet and every worker down with it: the training processes
never hear of the pre-emption and the steps since the last checkpoint are lost. The chart runs
this command as the worker containers' preStop hook instead, which Kubernetes runs first, within
the pod's terminationGracePeriodSeconds: it sends SIGTERM to the Ray Train workers of this node
(the signal the training loop turns into a checkpoint at the next step, every worker together,
see train/faults.py) and returns once they have exited, so that `ray start` is signalled only
after the checkpoint is stored.
"""

from __future__ import annotations

import logging
import signal
import time

import psutil

log = logging.getLogger(__name__)

# Ray names its worker processes after the actor they host (setproctitle), e.g.
# "ray::RayTrainWorker.run_train_fn"; the name is the stable part across Ray versions.
TRAIN_WORKER_TITLE = "ray::RayTrainWorker"


def train_workers() -> list[psutil.Process]:
    """The Ray Train worker processes on this machine (this pod)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if cmdline and cmdline[0].startswith(TRAIN_WORKER_TITLE):
            found.append(proc)
    return found


def drain(timeout_s: float, poll_s: float = 0.5) -> int:
    """SIGTERM this node's training workers and wait up to `timeout_s` for them to exit.
    Returns how many were still running at the deadline (0: all checkpointed and exited)."""
    workers = train_workers()
    if not workers:
        log.info("drain: no Ray Train worker on this node")
        return 0
    for proc in workers:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    log.warning(
        "drain: SIGTERM sent to %d training worker(s) %s; waiting up to %.0f s for their "
        "pre-emption checkpoint",
        len(workers),
        [p.pid for p in workers],
        timeout_s,
    )
    deadline = time.monotonic() + timeout_s
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(poll_s)
        alive = [p for p in alive if _running(p)]
    if alive:
        log.error(
            "drain: %d training worker(s) still running after %.0f s: the pre-emption "
            "checkpoint did not finish in time; raise terminationGracePeriodSeconds",
            len(alive),
            timeout_s,
        )
    return len(alive)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
