"""The Ray Train worker loop: load (or resume) -> step -> report -> checkpoint, top to bottom."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from raycpt import augment_pool
from raycpt import checkpoint as ckpt
from raycpt.augment import strength_at
from raycpt.config import CPTConfig
from raycpt.loader import CPTDataLoader, DataExhausted, Layout
from raycpt.prepare import load_manifest
from raycpt.train.engine import (
    build_model,
    build_optimizer,
    deepspeed_config,
    load_tokenizer,
    resolve_precision,
)

log = logging.getLogger(__name__)
PROBE_LEN = 32


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        return ray.train.torch.get_device()
    return torch.device("cpu")


def _manifest_ids(cfg: CPTConfig) -> dict:
    """What each source read, for the checkpoint metadata: location, split and shard hashes."""
    out = {}
    for s in cfg.data.sources:
        split = load_manifest(s.path)["splits"][s.split]
        out[s.name] = {
            "path": s.path,
            "split": s.split,
            "shards": [sh["sha256"][:16] for sh in split["shards"]],
        }
    return out


class Worker:
    """One Ray Train worker's state for a run: engine, data loader and counters."""

    def __init__(self, cfg: CPTConfig, start_from: str | None, augment_app: str | None = None):
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        self.cfg = cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = _device(cfg.scaling.use_gpu)
        torch.manual_seed(cfg.seed)
        deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
        self.precision = resolve_precision(cfg.deepspeed, cfg.scaling.use_gpu)
        self.ds_config = deepspeed_config(cfg, self.precision, self.world)
        # Must stay alive while the model is built: transformers then creates ZeRO-3 params
        # already partitioned (zero.Init), so no worker holds the whole model in memory.
        self._hf_ds = HfDeepSpeedConfig(self.ds_config) if cfg.deepspeed.zero_stage == 3 else None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        self.tokenizer = load_tokenizer(cfg.model)
        model = build_model(cfg.model, self.tokenizer, cfg.data.seq_len, dtype)
        self.model_config = model.config
        opt, sched = build_optimizer(model, cfg.train, cfg.horizon_steps, fused=cfg.scaling.use_gpu)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=self.ds_config
        )
        self.history: list[dict] = []  # every reported metrics window, kept in checkpoints
        self.segments: list[list[int]] = []  # [first step, last step] of each attempt
        self.started_from: str | None = None  # the checkpoint a new run / stage started from
        self.step, data_states = self._restore(start_from)
        self.segments.append([self.step, self.step])
        layout = Layout(
            self.rank,
            self.world,
            cfg.train.micro_batch_size,
            self.engine.gradient_accumulation_steps(),
        )
        self.loader = CPTDataLoader(
            cfg.data,
            self.tokenizer,
            cfg.seed,
            layout,
            cfg.horizon_steps,
            resume=data_states,
            transform=self._transform(augment_app),
        )
        self._add_embedding_noise(model)
        self.manifests = _manifest_ids(cfg) if self.rank == 0 else {}
        self.loader_state: dict | None = None

    def _transform(self, augment_app: str | None):
        """The reader's augmentation: the run's actor pool, in-process, or none."""
        aug = self.cfg.augment
        if not aug.enabled or not aug.transforms:
            return None
        if augment_app:
            return augment_pool.pool_transform(augment_app, aug.pool.batch_docs)
        return augment_pool.local_transform(aug)

    def _add_embedding_noise(self, model) -> None:
        """NEFTune: noise on input embeddings in training forward passes only (never eval)."""
        noise = self.cfg.augment.embedding_noise
        if not self.cfg.augment.enabled or noise.alpha <= 0:
            return

        def hook(module, args, output):
            if not module.training:
                return output
            progress = self.step / self.cfg.horizon_steps
            strength = strength_at(noise.schedule, noise.off_after, progress)
            scale = noise.alpha * strength / (output.shape[1] * output.shape[2]) ** 0.5
            return output + torch.empty_like(output).uniform_(-scale, scale)

        model.get_input_embeddings().register_forward_hook(hook)

    def _load_engine(self, folder: str, old_world: int, weights_only: bool = False) -> dict:
        """Load model, optimizer and scheduler state; with a different worker count, the weights
        and LR position only (DeepSpeed's ZeRO-1/2 optimizer shards are laid out per
        data-parallel rank; their universal conversion is not wired in yet)."""
        if old_world == self.world and weights_only:
            _, client = self.engine.load_checkpoint(folder, tag=ckpt.DS_TAG, load_module_only=True)
        elif old_world == self.world:
            _, client = self.engine.load_checkpoint(folder, tag=ckpt.DS_TAG)
        else:
            if self.cfg.deepspeed.zero_stage == 3:
                raise ckpt.CheckpointError(
                    f"this ZeRO-3 checkpoint was written by {old_world} workers; resuming on "
                    f"{self.world} is not supported yet: resume with scaling.num_workers: "
                    f"{old_world}, or export it and start a new run from the export"
                )
            _, client = self.engine.load_checkpoint(folder, tag=ckpt.DS_TAG, load_module_only=True)
            if client is not None and not weights_only:
                self.scheduler.last_epoch = client["step"] - 1
                self.scheduler.step()  # the schedule is a function of the step: same LR
            if self.rank == 0 and not weights_only:
                log.warning(
                    "worker count changed %d -> %d: weights, LR position and data "
                    "position restored; Adam moments start afresh",
                    old_world,
                    self.world,
                )
        if client is None:
            raise ckpt.CheckpointError(f"DeepSpeed could not load the checkpoint in {folder}")
        return client

    def _restore(self, start_from: str | None) -> tuple[int, list[dict] | None]:
        """Resume from the run's latest checkpoint, else from `start_from`, else start fresh."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and start_from is None:
            return 0, None
        ctx = checkpoint.as_directory() if checkpoint else None
        folder = ctx.__enter__() if ctx else ckpt.fetch(start_from)
        try:
            states = ckpt.read_data_states(folder)
            if checkpoint is None:
                # A new run (or stage) from another run's checkpoint: its weights only, with a
                # fresh optimizer, schedule and data position.
                self._load_engine(folder, old_world=len(states), weights_only=True)
                self.started_from = start_from
                if self.rank == 0:
                    log.info("starting from the weights of %s", start_from)
                return 0, None
            client = self._load_engine(folder, old_world=len(states))
            meta = ckpt.read_meta(folder)
            self.history = meta.get("history", [])
            self.segments = meta.get("segments", [])
            self.started_from = meta.get("started_from")
        finally:
            if ctx:
                ctx.__exit__(None, None, None)
        if self.rank == 0:
            log.info("resumed at step %d from %s", client["step"], checkpoint)
        return client["step"], states

    def train_step(self, micro_batches: list[np.ndarray]) -> float:
        """One optimizer step over this worker's micro-batches; returns the mean loss."""
        self.engine.train()
        losses = []
        for mb in micro_batches:
            x = torch.from_numpy(mb).to(self.device)
            loss = self.engine(input_ids=x, labels=x).loss
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
        return torch.stack(losses).mean().item()

    def mean_over_workers(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def probe_logits(self) -> dict:
        """Logits of the trained engine on a fixed batch, for export to verify itself against."""
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(
            0, len(self.tokenizer), (1, min(PROBE_LEN, self.cfg.data.seq_len)), generator=g
        )
        self.engine.eval()
        with torch.no_grad():
            logits = self.engine(input_ids=ids.to(self.device)).logits
        return {"input_ids": ids, "logits": logits.float().cpu(), "precision": self.precision}

    def save(self, metrics: dict, final: bool) -> None:
        """Take a checkpoint (collective) and report it with the metrics."""
        meta = None
        probe = self.probe_logits() if final else None
        data_state = self.loader_state
        if self.cfg.data.log_documents:
            data_state = {**data_state, "docs": self.loader.doc_log}
        if self.rank == 0:
            meta = {
                "run": self.cfg.name,
                "config": self.cfg.model_dump(mode="json"),
                "config_hash": self.cfg.digest(),
                "code_version": ckpt.code_version(),
                "world_size": self.world,
                "precision": self.precision,
                "zero_stage": self.cfg.deepspeed.zero_stage,
                "manifests": self.manifests,
                "tokens_per_source": data_state["tokens_per_source"],
                "stage": self.cfg.stage,
                "started_from": self.started_from,
                "counters": self.loader.counters(),
                "history": self.history,
                "segments": self.segments,
            }
        folder = ckpt.write_local(
            self.engine,
            self.step,
            self.rank,
            data_state,
            meta,
            (self.model_config, self.tokenizer) if self.rank == 0 else None,
        )
        if probe is not None and self.rank == 0:
            torch.save(probe, os.path.join(folder, ckpt.PROBE))
        try:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=ckpt.dir_name(self.step),
            )
        finally:
            ckpt.remove_local(folder)

    def fit(self) -> None:
        cfg = self.cfg
        window = {"loss": 0.0, "steps": 0, "t0": time.perf_counter(), "wait0": 0.0}
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        saved_step = self.step
        while self.step < cfg.train.max_steps:
            data = self._next_step()
            if data is None:
                break
            loss = self.train_step(data.micro_batches)
            self.step += 1
            self.loader_state = data.state
            window["loss"] += loss
            window["steps"] += 1
            is_ckpt = self.step % cfg.checkpoint.every_steps == 0
            is_last = self.step == cfg.train.max_steps
            if not (self.step % cfg.train.log_every == 0 or is_ckpt or is_last):
                continue
            metrics = self._window_metrics(window, tokens_per_step)
            self.history.append(metrics)
            self.segments[-1][1] = self.step
            if is_ckpt or is_last:
                self.save(metrics, final=is_last)
                saved_step = self.step
            else:
                ray.train.report(metrics)
            window.update(loss=0.0, steps=0, t0=time.perf_counter(), wait0=self.loader.wait_s)
        if self.step > saved_step:  # the data ran out before max_steps: keep what was trained
            self.history.append(self._window_metrics(window, tokens_per_step))
            self.segments[-1][1] = self.step
            self.save(self.history[-1], final=True)
        self.loader.close()

    def _next_step(self):
        """The next step's data, or None once any worker's data ran out (decided collectively)."""
        try:
            data, exhausted = self.loader.next_step(), 0.0
        except DataExhausted as err:
            data, exhausted = None, 1.0
            log.warning("worker %d: %s (data.on_exhausted: stop)", self.rank, err)
        if self.cfg.data.on_exhausted == "stop" and self.mean_over_workers([exhausted])[0] > 0:
            if self.rank == 0:
                log.warning("stopping at step %d: the data is exhausted", self.step)
            return None
        return data

    def _window_metrics(self, window: dict, tokens_per_step: int) -> dict:
        elapsed = time.perf_counter() - window["t0"]
        wait = self.loader.wait_s - window["wait0"]
        loss, wait_frac = self.mean_over_workers(
            [window["loss"] / max(window["steps"], 1), wait / max(elapsed, 1e-9)]
        )
        grad_norm = self.engine.get_global_grad_norm()  # None under ZeRO-0: not reported
        metrics = {
            "step": self.step,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens": self.step * tokens_per_step,
            "tokens_per_s": window["steps"] * tokens_per_step / max(elapsed, 1e-9),
            "data_wait_frac": wait_frac,
            **{f"tokens/{k}": v for k, v in self.loader_state["tokens_per_source"].items()},
        }
        aug = self.loader.counters()
        if aug:  # summed over workers
            keys = sorted(aug)
            values = self.mean_over_workers([float(aug[k]) for k in keys])
            metrics.update({k: round(v * self.world) for k, v in zip(keys, values)})
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.rank == 0:
            log.info("step %(step)d loss %(loss).4f lr %(lr).2e %(tokens_per_s).0f tok/s", metrics)
        return metrics


def train_loop_per_worker(config: dict) -> None:
    """Entry point run by every Ray Train worker; ``config`` carries the run config as a dict."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = CPTConfig.model_validate(config["cpt"])
    Worker(cfg, config.get("start_from"), config.get("augment_app")).fit()
