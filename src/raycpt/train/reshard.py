"""Resuming a ZeRO checkpoint on a different number of workers, optimizer state included.

ZeRO keeps the fp32 master weights and the Adam moments in flat partitions, one per
data-parallel rank, so a checkpoint written by N workers cannot be loaded as it is by M.
DeepSpeed's universal checkpoint conversion (``deepspeed.checkpoint.ds_to_universal``) rewrites
it as one folder per parameter name holding the full fp32 weight, ``exp_avg``, ``exp_avg_sq``
and ``step``; an engine loading with ``checkpoint.load_universal`` cuts those into its own
partitions. That works for ZeRO-1/2 and ZeRO-3 with the torch AdamW our engine uses. (A plain
load across worker counts, ``zero_optimization.elastic_checkpoint`` included, is refused by
DeepSpeed 0.19's ``_load_zero_checkpoint`` as soon as optimizer states are asked for.)

The conversion reads the stored checkpoint and writes a node-local copy in raycpt's cache,
once per node; the copy is deleted once every worker has loaded it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import shutil

import torch
import torch.distributed as dist

from raycpt import checkpoint as ckpt
from raycpt.train.engine import build_once, cache_dir

log = logging.getLogger(__name__)


def universal_dir(folder: str) -> str:
    """Where this node keeps the universal copy of the checkpoint in ``folder``."""
    with open(os.path.join(folder, ckpt.META), "rb") as f:  # unique per checkpoint (saved_at)
        key = hashlib.sha256(f.read()).hexdigest()[:20]
    return os.path.join(cache_dir(), "universal", key)


def universal_copy(folder: str) -> str:
    """A node-local folder holding the checkpoint in ``folder`` in DeepSpeed's universal form
    (tag ``ckpt.DS_TAG``), converted by the first worker on the node that asks for it."""
    return build_once(universal_dir(folder), lambda staging: _convert(folder, staging))


def _convert(folder: str, out: str) -> None:
    """DeepSpeed's ds_to_universal on ``folder``/ds into ``out``/ds (it reads, never writes, the
    source). Called in-process: its parallel mode forks worker processes, which a Ray worker
    should not do on a small node, and its command line is only a thin wrapper around main()."""
    from deepspeed.checkpoint.ds_to_universal import main

    args = argparse.Namespace(
        input_folder=os.path.join(folder, ckpt.DS_TAG),
        output_folder=os.path.join(out, ckpt.DS_TAG),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # ZeRO-1/2 conversion asks for the tensor/pipeline-parallel layout description that
        # Megatron-style clients store; with data parallelism only, its default is correct.
        inject_missing_state=True,
    )
    log.info("converting %s to a universal checkpoint in %s", folder, out)
    os.makedirs(out, exist_ok=True)
    main(args)


def load_resharded(engine, folder: str, old_world: int) -> dict | None:
    """Load the checkpoint in ``folder``, written by ``old_world`` workers, into ``engine``
    (another worker count): weights, fp32 master weights, Adam moments and step, LR schedule.
    Collective: every worker calls it. Returns DeepSpeed's client state (None on failure)."""
    local = universal_copy(folder)
    with _universal_load(engine):
        _, client = engine.load_checkpoint(local, tag=ckpt.DS_TAG)
    _repair_optimizer(engine.optimizer.optimizer, os.path.join(local, ckpt.DS_TAG))
    dist.barrier()  # every worker has read its node's copy: it can go, with its lock file
    shutil.rmtree(local, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(local + ".lock")
    if dist.get_rank() == 0:
        log.info(
            "worker count changed %d -> %d: optimizer state re-partitioned from %s",
            old_world,
            dist.get_world_size(),
            folder,
        )
    return client


@contextlib.contextmanager
def _universal_load(engine):
    """``checkpoint.load_universal`` on for one load. DeepSpeed reads this setting only while
    loading; setting it here, not in the config, keeps the engine's construction independent
    of which checkpoint (if any) it resumes from and leaves later same-count loads normal."""
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = False


def _repair_optimizer(optimizer, universal: str) -> None:
    """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal load (harmless for ZeRO-1/2, which
    loads these right): it gives every param group the first group's hyperparameters (the
    norms would get weight decay), and every partition one shared ``step`` tensor, which torch's
    Adam then increments once per partition and step (bias correction would run ahead)."""
    saved = torch.load(os.path.join(universal, "zero", "optimizer_state.pt"), weights_only=False)
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
