"""Resuming on a different number of workers restores the optimizer too: a real run is
checkpointed on N workers and resumed on M through DeepSpeed's universal checkpoint; the resumed
engine holds the very fp32 master weights, Adam moments and step counts the saving engine had,
and training goes on with every document still seen at most once."""

import hashlib
import os
from pathlib import Path

import pytest
import torch

from raycpt import checkpoint as ckpt
from raycpt.config import CPTConfig, parse_config
from raycpt.train import launch, reshard
from raycpt.train.loop import Worker

pytestmark = pytest.mark.slow
ADAM_STATES = ("exp_avg", "exp_avg_sq")
GROUP_KEYS = ("lr", "weight_decay", "betas", "eps")


def full_state(engine) -> dict:
    """Each parameter's full (unpartitioned) fp32 master weight and Adam moments by name, and
    the Adam step counts. Collective under ZeRO: every worker calls it."""
    from deepspeed.utils import (
        lazy_init_hp_params_optimizer_state,
        safe_get_full_fp32_param,
        safe_get_full_optimizer_state,
    )

    opt = engine.optimizer
    if hasattr(opt, "bit16_groups") and opt.optimizer.state:
        # DeepSpeed 0.19.8's ZeRO-1/2 links parameters to their Adam state after the first
        # param group's first step, before the other groups have any: link them all here.
        for group, flat in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups, strict=True):
            lazy_init_hp_params_optimizer_state(group, flat, opt.optimizer.state)
    params = {}
    for name, p in engine.module.named_parameters():
        params[name] = {"fp32": safe_get_full_fp32_param(p).clone()}
        if opt.optimizer.state:
            for key in ADAM_STATES:
                params[name][key] = safe_get_full_optimizer_state(p, key).clone()
    steps = sorted({float(s["step"]) for s in opt.optimizer.state.values()})
    groups = [{k: g[k] for k in GROUP_KEYS} for g in opt.optimizer.param_groups]
    return {"params": params, "steps": steps, "groups": groups}


def record_path(cfg: CPTConfig, world: int) -> str:
    return os.path.join(cfg.storage_path, f"{cfg.name}-on-{world}.pt")


def loop_recording_state(config: dict) -> None:
    """The run's own worker loop, plus the engine's full state right after it was built (and
    the checkpoint loaded) and after the last step, saved by rank 0 for the test to compare."""
    cfg = CPTConfig.model_validate(config["cpt"])
    worker = Worker(cfg, config.get("start_from"), config.get("augment_app"))
    loaded = full_state(worker.engine)
    worker.fit()
    end = full_state(worker.engine)
    if worker.rank == 0:
        torch.save({"loaded": loaded, "end": end}, record_path(cfg, worker.world))


def folder_digest(folder: str) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def logged_docs(checkpoint: str) -> list:
    return [tuple(d) for st in ckpt.read_data_states(checkpoint) for d in st.get("docs", [])]


def assert_same_params(saved: dict, loaded: dict, keys: tuple) -> None:
    assert sorted(loaded) == sorted(saved)
    for name in saved:
        for key in keys:
            assert torch.equal(loaded[name][key], saved[name][key]), (name, key)


def resumed_lr(cfg: CPTConfig, step: int) -> float:
    """The LR the schedule gives at `step`: resuming keeps the schedule's position."""
    from raycpt.train.schedule import lr_multiplier

    return cfg.train.lr * lr_multiplier(cfg.train.schedule, cfg.horizon_steps)(step)


@pytest.mark.parametrize(
    ("stage", "before", "after"),
    [(2, 2, 1), (2, 1, 2), (3, 2, 1), (1, 2, 1)],
    ids=["z2-2to1", "z2-1to2", "z3-2to1", "z1-2to1"],
)
def test_resume_on_another_worker_count_restores_the_optimizer(
    ray_cluster, run_config, monkeypatch, stage, before, after
):
    monkeypatch.setattr(launch, "train_loop_per_worker", loop_recording_state)
    common = {
        "deepspeed__zero_stage": stage,
        "data__log_documents": True,
        "checkpoint__every_steps": 4,
        "train__log_every": 4,
        "train__schedule": {"warmup_steps": 2, "horizon_steps": 8},
    }
    first = parse_config(
        run_config(name="reshard", train__max_steps=4, scaling__num_workers=before, **common)
    )
    launch.run(first)
    stored = ckpt.resolve(launch.run_dir(first))
    stored_files = folder_digest(stored)
    second = parse_config(
        run_config(name="reshard", train__max_steps=8, scaling__num_workers=after, **common)
    )
    launch.run(second)

    saved = torch.load(record_path(first, before))["end"]
    resumed = torch.load(record_path(second, after))
    assert saved["steps"] == [4.0]
    assert resumed["loaded"]["steps"] == [4.0]  # Adam's bias correction goes on from step 4
    assert_same_params(saved["params"], resumed["loaded"]["params"], ("fp32", *ADAM_STATES))
    assert resumed["loaded"]["groups"] == saved["groups"]  # e.g. no weight decay on norms
    assert [g["weight_decay"] for g in saved["groups"]] == [0.1, 0.0]
    assert resumed["end"]["steps"] == [8.0]
    # the stored checkpoint is read, never written; the node-local universal copy is gone
    assert folder_digest(stored) == stored_files
    left = reshard.universal_dir(stored)
    assert not os.path.exists(left) and not os.path.exists(left + ".lock")

    final = ckpt.resolve(launch.run_dir(second))
    meta = ckpt.read_meta(final)
    assert meta["world_size"] == after and meta["segments"] == [[0, 4], [4, 8]]
    assert meta["history"][-1]["lr"] == pytest.approx(resumed_lr(second, 8))
    assert meta["tokens_per_source"] == {"domain": 8 * 8 * 64}
    docs_before, docs_after = logged_docs(stored), logged_docs(final)
    assert len(docs_after) == len(set(docs_after)), "a document was trained on twice"
    assert set(docs_before) < set(docs_after), "documents of the first workers were lost"

    if stage == 3:  # a new run from that checkpoint on another count: its weights, fresh Adam
        fresh = parse_config(
            run_config(name="from-z3", train__max_steps=1, scaling__num_workers=after, **common)
        )
        launch.run(fresh, start_from=stored)
        started = torch.load(record_path(fresh, after))["loaded"]
        assert started["steps"] in ([], [0.0]), "a new run starts with a fresh optimizer"
        assert_same_params(saved["params"], started["params"], ("fp32",))
