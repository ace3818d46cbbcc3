"""Faults a training run handles itself rather than dying hours in: a pre-flight step and a
storage probe before training, non-finite steps (skip, roll back or stop), pre-emption by
SIGTERM (checkpoint at the next step boundary, then a clean exit) and a checkpoint that cannot
be stored (a clear stop, the previous checkpoint intact).

Every decision that changes what the workers do next is taken collectively: each worker
contributes its local view to one small all-reduce per step, so all of them act alike.
"""

from __future__ import annotations

import logging
import math
import posixpath
import signal
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow.fs as pafs
import ray
import torch

from raycpt import checkpoint as ckpt
from raycpt import storage
from raycpt.config import DataConfig, FailureConfig
from raycpt.prepare import load_manifest

log = logging.getLogger(__name__)

# Set by the SIGTERM handler of this worker process; read by the training thread.
_SIGTERM = threading.Event()


class RunStopped(RuntimeError):
    """The workers stopped the run on purpose (non-finite loss, failed pre-flight step, a
    checkpoint that could not be stored).

    They end normally and worker 0 returns the reason (Ray Train's ``Result.return_value``),
    which the driver raises: Ray Train's Result carries only the latest checkpoint's metrics,
    an error raised in a worker would be retried failure.max_failures times, and a note written
    to the run's storage would fail when that storage is the fault."""


class PreflightError(RuntimeError):
    """A check before training failed; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Before training
# ---------------------------------------------------------------------------------------------


def probe_storage(location: str) -> None:
    """Write, read back and delete a small object at `location` (the run's storage_path), so an
    unwritable folder or bucket fails on the driver at once instead of at the first checkpoint."""
    probe = storage.join(location, f".raycpt-write-probe-{uuid.uuid4().hex[:12]}")
    payload = b"raycpt write probe " + uuid.uuid4().hex.encode()
    try:
        storage.write_bytes(probe, payload)
        if storage.read_bytes(probe) != payload:
            raise storage.StorageError(f"{probe}: read back different bytes than were written")
        storage.delete(probe)
    except (storage.StorageError, OSError) as err:
        raise PreflightError(
            f"storage_path {location} is not usable for checkpoints: {err}. Fix the location "
            "or its permissions (bucket policy, credentials), or choose another storage_path"
        ) from None


def check_shards(data: DataConfig) -> None:
    """Every shard the manifests list exists with the size they record: a dataset with a missing
    or truncated shard fails on the driver, not when a worker reaches that shard hours later.
    (Contents are checked against the manifest's sha256 as each shard is read: stream.py.)"""
    for src in data.sources:
        split = load_manifest(src.path)["splits"][src.split]
        sizes = _sizes(src.path, {posixpath.dirname(sh["path"]) for sh in split["shards"]})
        for shard in split["shards"]:
            where = f"data.sources[{src.name}]: shard {storage.join(src.path, shard['path'])}"
            size = sizes.get(shard["path"])
            if size is None:
                raise PreflightError(
                    f"{where} is listed in the manifest but missing: the dataset is incomplete; "
                    "restore the shard or run prepare again"
                )
            if size != shard["num_bytes"]:
                raise PreflightError(
                    f"{where} has {size} bytes, its manifest says {shard['num_bytes']}: it "
                    "was altered or truncated; restore the shard or run prepare again"
                )


def _sizes(dataset: str, folders: set[str]) -> dict[str, int]:
    """Size of every file in these folders of a dataset, by path relative to it: one listing
    per folder (a few requests on S3, where a HEAD per shard would be thousands)."""
    fs, root = storage.filesystem(dataset)
    sizes = {}
    for folder in folders:
        base = f"{root}/{folder}".rstrip("/")
        for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
            if info.type == pafs.FileType.File:
                sizes[posixpath.join(folder, info.base_name)] = info.size
    return sizes


def dry_run_step(engine, micro_batch: int, seq_len: int, vocab: int, device) -> str | None:
    """One forward and backward pass at the run's micro-batch and sequence length, before the
    first step; returns None, or what went wrong (out of memory, a shape error) and what to do.

    The gradients come from ``torch.autograd.grad``, which returns them instead of accumulating
    them into ``.grad``: DeepSpeed's gradient hooks never fire, so its buffers, step counters,
    optimizer and scheduler are untouched. The RNG state is restored, so a run with the pre-flight
    step trains exactly like one without. All gradients exist at once here (as under ZeRO-0/1;
    ZeRO-2 frees them bucket by bucket), so the check errs on the side of refusing.
    """
    model = engine.module
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(
        0, vocab, (micro_batch, seq_len), generator=torch.Generator().manual_seed(0)
    )
    ids = ids.to(device)
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            loss = model(input_ids=ids, labels=ids).loss
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            del grads, loss
        return None
    except torch.OutOfMemoryError as err:
        return (
            f"the pre-flight step (train.micro_batch_size {micro_batch} x data.seq_len {seq_len}) "
            f"ran out of memory on {device}: {str(err).splitlines()[0]}. Lower "
            "train.micro_batch_size (gradient accumulation keeps global_batch_size), or set "
            "model.gradient_checkpointing, deepspeed.zero_stage 3 or deepspeed.offload_optimizer"
        )
    except (RuntimeError, ValueError, IndexError) as err:
        return (
            f"the pre-flight step (train.micro_batch_size {micro_batch} x data.seq_len {seq_len}) "
            f"failed: {type(err).__name__}: {err}"
        )
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Pre-emption
# ---------------------------------------------------------------------------------------------


def _on_sigterm(signum, frame) -> None:
    _SIGTERM.set()


def _install_sigterm_handler() -> bool:
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def watch_sigterm() -> None:
    """Make SIGTERM to this worker process request a checkpoint instead of killing it.

    Ray's own handler raises SystemExit (the run then restarts from its last checkpoint, losing
    the steps since). Python accepts handlers only on the main thread, and Ray Train runs the
    training function on another one; the worker actor's `execute` method runs on the main
    thread, so the handler is installed through it.
    """
    _SIGTERM.clear()
    me = ray.get_runtime_context().current_actor
    ray.get(me.execute.remote(_install_sigterm_handler))


# ---------------------------------------------------------------------------------------------
# During training
# ---------------------------------------------------------------------------------------------


@dataclass
class StepVerdict:
    """What the workers agreed on after a step."""

    nonfinite: bool = False  # the loss or the gradients were NaN/Inf on some worker
    preempted: bool = False  # some worker got SIGTERM: checkpoint now and exit
    action: str = "train"  # train | skip | rollback | stop
    reason: str = ""


class StepFaults:
    """Watches every step for non-finite values and pre-emption and decides what to do, per
    the run's `failure` config; keeps the counts that go into the metrics."""

    def __init__(self, cfg: FailureConfig, precision: str, history: list[dict]):
        self.cfg = cfg
        # With fp16 a skipped step is routine (the loss scaler found an overflow and lowers the
        # scale); only a non-finite loss counts then.
        self.check_applied = precision != "fp16"
        last = history[-1] if history else {}  # counts carry over a resume
        self.counts = {k: int(last.get(f"nonfinite/{k}", 0)) for k in ("skipped", "rollbacks")}
        self.preempted = False

    def after_step(
        self, step: int, loss: float, engine, mean_over_workers: Callable[[list[float]], list]
    ) -> StepVerdict:
        """Collective: every worker must call this after every step."""
        bad_loss = not math.isfinite(loss)
        bad_grad = self.check_applied and not engine.was_step_applied()
        nonfinite, preempted = mean_over_workers(
            [float(bad_loss or bad_grad), float(_SIGTERM.is_set())]
        )
        verdict = StepVerdict(nonfinite=nonfinite > 0, preempted=preempted > 0)
        self.preempted = self.preempted or verdict.preempted
        if verdict.nonfinite:
            self._decide(step, verdict)
        return verdict

    def _decide(self, step: int, verdict: StepVerdict) -> None:
        seen = self.counts["skipped"] + self.counts["rollbacks"] + 1
        what = f"non-finite loss or gradient norm at step {step}"
        if self.cfg.on_nan == "stop":
            verdict.action = "stop"
            verdict.reason = (
                f"{what} (failure.on_nan: stop). Resume from the last checkpoint with a lower "
                "train.lr, or set failure.on_nan: skip or rollback"
            )
        elif seen > self.cfg.max_nonfinite_steps:
            verdict.action = "stop"
            verdict.reason = (
                f"{what}: {seen} non-finite steps, more than failure.max_nonfinite_steps "
                f"({self.cfg.max_nonfinite_steps}); the run diverges: lower train.lr or "
                "check the data"
            )
        else:
            verdict.action = self.cfg.on_nan
            self.counts["skipped" if verdict.action == "skip" else "rollbacks"] += 1
            verdict.reason = f"{what}: {verdict.action} (failure.on_nan)"
        log.warning("%s", verdict.reason)

    def metrics(self) -> dict[str, int]:
        """Counts for the metrics: non-finite steps so far, and whether SIGTERM stopped us."""
        return {
            **{f"nonfinite/{k}": v for k, v in self.counts.items()},
            "preempted": self.preempted,
        }


def scale_lr(scheduler, factor: float) -> None:
    """Scale the LR schedule (and the optimizer's current LR) by `factor`, for good: the scaled
    base LRs are part of the scheduler state that later checkpoints save."""
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in scheduler.optimizer.param_groups:
        group["lr"] *= factor


def inject_nan(model, steps: list[int], current_step: Callable[[], int]) -> None:
    """Debug (failure.debug_nan_steps): make the logits, hence the loss and gradients, NaN in the
    first training forward pass of each listed step, once per worker process."""
    pending = set(steps)

    def hook(module, args, output):
        step = current_step() + 1  # the step being computed
        if module.training and step in pending:
            pending.discard(step)
            log.warning("failure.debug_nan_steps: poisoning step %d with NaN", step)
            return output * float("nan")
        return output

    model.get_output_embeddings().register_forward_hook(hook)


def rollback(worker) -> int:
    """Reload the model, optimizer and schedule of the run's latest checkpoint into `worker`,
    scale its LR by failure.rollback_lr_factor, and return the checkpoint's step.

    The data stream is not rewound: the batches since that checkpoint (the one that produced the
    non-finite values among them) are not replayed, as in large runs that skip past a loss spike.
    """
    cfg = worker.cfg
    location = _last_checkpoint(storage.join(cfg.storage_path, cfg.name), worker.step)
    if location is None:
        raise RunStopped(
            f"failure.on_nan: rollback at step {worker.step}, but the run has no checkpoint yet: "
            "lower checkpoint.every_steps, or use failure.on_nan: skip"
        )
    folder = ckpt.fetch(location)
    try:
        # the checkpoint may predate a change of worker count (a resume on fewer workers)
        old_world = len(ckpt.read_data_states(folder))
        client = worker._load_engine(folder, old_world=old_world)
        meta = ckpt.read_meta(folder)
    finally:
        if storage.is_remote(location):
            ckpt.remove_local(folder)
    scale_lr(worker.scheduler, cfg.failure.rollback_lr_factor)
    worker.history = meta.get("history", [])
    worker.segments = [*meta.get("segments", []), [client["step"], client["step"]]]
    log.warning(
        "rolled back to step %d (%s), LR x %g",
        client["step"],
        location,
        cfg.failure.rollback_lr_factor,
    )
    return client["step"]


def unsaved_checkpoint(
    step: int, dest: str, error: str, run: str, latest: ray.train.Checkpoint | None
) -> str:
    """Why the run stops when checkpoint `step` could not be stored at `dest` (after the storage
    client's retries): the cause, and what a run started again resumes from (`latest`, Ray
    Train's last registered checkpoint, or none)."""
    if latest is None:
        after = "the run has no restorable checkpoint yet: a run started again begins anew"
    else:
        name = posixpath.basename(latest.path.rstrip("/"))
        after = (
            f"the latest restorable checkpoint is {name} ({storage.join(run, name)}): fix the "
            "storage, then run again to resume from it"
        )
    return (
        f"checkpoint {ckpt.dir_name(step)} (step {step}) could not be written to {dest}: "
        f"{error}. The run stopped rather than train on without a checkpoint; its partial "
        "upload was removed (or, where it could not be, is ignored: it was never registered); "
        f"{after}"
    )


def _last_checkpoint(run: str, step: int) -> str | None:
    """The latest complete checkpoint folder at or before `step`. Not Ray's registered list:
    the controller may not have registered the one this attempt just saved yet, and folders past
    `step` are leftovers of an earlier attempt, not this run's history."""
    for at, location in reversed(ckpt.step_folders(run)):
        if at <= step:
            try:
                return ckpt.resolve(location)
            except ckpt.CheckpointError:
                continue
    return None


def raise_if_stopped(result: ray.train.Result) -> None:
    """On the driver, after a run: one that its workers stopped on purpose ends in an error."""
    if result.return_value:
        raise RunStopped(result.return_value)
