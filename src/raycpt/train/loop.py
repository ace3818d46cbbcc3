"""The Ray Train worker loop: load (or resume) -> step -> report -> checkpoint, top to bottom."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from raycpt import augment_pool, storage
from raycpt import checkpoint as ckpt
from raycpt.augment import strength_at
from raycpt.config import CPTConfig
from raycpt.loader import CPTDataLoader, DataExhausted, Layout
from raycpt.prepare import load_manifest
from raycpt.train import adapters, faults, reshard
from raycpt.train.engine import (
    build_model,
    build_optimizer,
    deepspeed_config,
    load_tokenizer,
    resolve_precision,
)
from raycpt.train.evaluation import Evaluator, eval_history, stop_reason
from raycpt.train.faults import StepFaults, StepVerdict

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
        self.early_stop: str | None = None  # why the run stopped early, once it has
        self.ckpt_stats: list[float] | None = None  # last save: write s, upload s, bytes, retries
        self.stopped: str | None = None  # why the workers stopped the run on purpose
        self.evaluator = Evaluator(
            cfg.eval,
            self.tokenizer,
            cfg.data.seq_len,
            cfg.train.micro_batch_size,
            self.rank,
            self.world,
        )
        t0 = time.perf_counter()
        self.step, data_states = self._restore(start_from)
        self.restore_s = time.perf_counter() - t0 if data_states else None  # first window
        if self.rank == 0:  # before any worker of this group saves (the barrier below)
            ckpt.remove_partial(storage.join(cfg.storage_path, cfg.name), self.step)
        dist.barrier()
        self.segments.append([self.step, self.step])
        if self.rank == 0 and self.world != cfg.scaling.num_workers:
            log.warning(
                "elastic: training on %d of %d workers from step %d, gradient accumulation %d "
                "(global batch %d)",
                self.world,
                cfg.scaling.num_workers,
                self.step,
                self.engine.gradient_accumulation_steps(),
                cfg.train.global_batch_size,
            )
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
        self.faults = StepFaults(cfg.failure, self.precision, self.history)

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
        """Load model, optimizer and scheduler state (the weights only for a new run or stage).
        A checkpoint from another worker count is re-partitioned (`reshard`)."""
        if weights_only:
            # load_optimizer_states=False makes DeepSpeed gather the full fp32 weights from
            # every worker's shard under ZeRO-3, on any worker count. (With True it reads the
            # per-rank model files, which under ZeRO-3 hold only empty placeholders: the new run
            # silently started from the base model.) ZeRO-0/1/2 model files hold the whole module.
            _, client = self.engine.load_checkpoint(
                folder, tag=ckpt.DS_TAG, load_module_only=True, load_optimizer_states=False
            )
        elif old_world == self.world or self.cfg.deepspeed.zero_stage == 0:
            # without ZeRO the optimizer state is saved whole: any worker count can load it
            _, client = self.engine.load_checkpoint(folder, tag=ckpt.DS_TAG)
        else:
            client = reshard.load_resharded(self.engine, folder, old_world)
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
            self.evaluator.base = meta.get("eval_base")
            self.early_stop = meta.get("early_stop")
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

    def sum_over_workers(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def mean_over_workers(self, values: list[float]) -> list[float]:
        return [v / self.world for v in self.sum_over_workers(values)]

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

    def save(self, metrics: dict, final: bool) -> bool:
        """Take a checkpoint (collective) and report it with the metrics; False when it could not
        be stored (the run is then stopped: `_stop_unsaved`)."""
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
                "eval_base": self.evaluator.base,
                "early_stop": self.early_stop,
                "score": metrics.get(self.cfg.checkpoint.score_metric or ""),
            }
        t0 = time.perf_counter()
        folder = ckpt.write_local(
            self.engine,
            self.step,
            self.rank,
            data_state,
            meta,
            (self.model_config, self.tokenizer, *adapters.peft_configs(self.engine.module))
            if self.rank == 0
            else None,
        )
        if probe is not None and self.rank == 0:
            torch.save(probe, os.path.join(folder, ckpt.PROBE))
        seal = ckpt.seal_local(folder, self.rank)
        t1, retries = time.perf_counter(), storage.retry_count()
        size = ckpt.folder_bytes(folder)
        dest = storage.join(self.cfg.storage_path, self.cfg.name, ckpt.dir_name(self.step))
        # Uploaded here, then reported as already persisted (NO_UPLOAD), rather than through
        # report(checkpoint_upload_fn=...): an upload that raises inside report() leaves that
        # worker's report sequence waiting forever, and the error would only reach Ray Train's
        # FailureConfig, which restarts the group to re-train the steps and fail the same way.
        try:
            written, error = storage.upload_dir(folder, dest, last=seal), None
        except storage.StorageError as err:
            written, error = [], str(err)
        finally:
            ckpt.remove_local(folder)
        error = self.first_error(error)
        if error:
            self._stop_unsaved(dest, written, error)
            return False
        fs, path = storage.filesystem(dest)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint(path=path, filesystem=fs),
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
        )
        # reported with the next metrics window: this one has already gone out
        self.ckpt_stats = [t1 - t0, time.perf_counter() - t1, size, storage.retry_count() - retries]
        return True

    def _stop_unsaved(self, dest: str, written: list[str], error: str) -> None:
        """A checkpoint that some worker could not store: every worker takes its part back
        (a checkpoint is all or nothing), and the run stops, naming the latest one Ray Train
        registered, which a run started again resumes from."""
        storage.discard(written)
        latest = ray.train.get_checkpoint()  # the last one every worker reported
        run = storage.join(self.cfg.storage_path, self.cfg.name)
        self.stop_run(faults.unsaved_checkpoint(self.step, dest, error, run, latest))

    def fit(self) -> None:
        cfg = self.cfg
        window = {"loss": 0.0, "steps": 0, "t0": time.perf_counter(), "wait0": 0.0}
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        saved_step = self.step
        if self.early_stop:
            if self.rank == 0:
                log.warning("this run already stopped early (%s): nothing to do", self.early_stop)
            self.loader.close()
            return
        if self.step == 0 and self.evaluator:  # the base model: the reference for gain/forgetting
            metrics = {"step": 0, "tokens": 0, **self._evaluate()}
            self.history.append(metrics)
            ray.train.report(metrics)
        while self.step < cfg.train.max_steps:
            data = self._next_step()
            if data is None:
                break
            loss = self.train_step(data.micro_batches)
            self.step += 1
            self.loader_state = data.state
            verdict = self._check_step(loss)  # collective: NaN/Inf and SIGTERM (faults.py)
            if verdict.action == "stop":
                return  # reported; nothing is saved after the last good checkpoint
            if verdict.action == "rollback":
                window.update(loss=0.0, steps=0)  # the rolled-back steps' losses are void
                continue
            if verdict.action == "train":  # a skipped step's loss is not in the metrics
                window["loss"] += loss
                window["steps"] += 1
            is_ckpt = self.step % cfg.checkpoint.every_steps == 0 or verdict.preempted
            is_last = self.step == cfg.train.max_steps
            is_eval = self.evaluator.due(self.step, is_last)
            if not (self.step % cfg.train.log_every == 0 or is_ckpt or is_last or is_eval):
                continue
            metrics = self._close_window(window, tokens_per_step, evaluate=is_eval)
            if is_eval:
                self.early_stop = stop_reason(eval_history(self.history), cfg.eval.early_stop)
            if is_ckpt or is_last or self.early_stop:
                if not self.save(metrics, final=is_last or bool(self.early_stop)):
                    return  # the checkpoint could not be stored: the run stopped
                saved_step = self.step
            else:
                ray.train.report(metrics)
            window.update(loss=0.0, steps=0, t0=time.perf_counter(), wait0=self.loader.wait_s)
            if verdict.preempted:
                if self.rank == 0:
                    log.warning("pre-empted (SIGTERM): checkpoint at step %d taken", self.step)
                break
            if self.early_stop:
                if self.rank == 0:
                    log.warning("stopping early at step %d: %s", self.step, self.early_stop)
                break
        if self.step > saved_step:  # the data ran out before max_steps: keep what was trained
            metrics = self._close_window(window, tokens_per_step, evaluate=bool(self.evaluator))
            if not self.save(metrics, final=True):
                return
        self.loader.close()

    def _close_window(self, window: dict, tokens_per_step: int, evaluate: bool) -> dict:
        """The metrics of the steps since the last report (with an evaluation if asked),
        recorded in the run's history."""
        metrics = self._window_metrics(window, tokens_per_step)
        if evaluate:
            metrics.update(self._evaluate())
        self.history.append(metrics)
        self.segments[-1][1] = self.step
        return metrics

    def first_error(self, error: str | None) -> str | None:
        """Collective: the first worker's error ("worker N: ..."), on every worker; or None."""
        errors = [None] * self.world
        dist.all_gather_object(errors, error)
        return next((f"worker {i}: {e}" for i, e in enumerate(errors) if e), None)

    def _check_step(self, loss: float) -> StepVerdict:
        """Apply the run's fault policy after a step: roll back here, or report a stop."""
        verdict = self.faults.after_step(self.step, loss, self.engine, self.mean_over_workers)
        if verdict.action == "rollback":
            try:
                self.step = faults.rollback(self)
            except faults.RunStopped as err:
                verdict.action, verdict.reason = "stop", str(err)
        if verdict.action == "stop":
            self.stop_run(verdict.reason)
        return verdict

    def stop_run(self, reason: str) -> None:
        """End the run on purpose: the workers return normally (so Ray Train does not restart
        them) and worker 0's return value carries the reason, which the driver raises."""
        if self.rank == 0:
            log.error("stopping the run at step %d: %s", self.step, reason)
        self.stopped = reason
        ray.train.report({"step": self.step, **self.faults.metrics()})
        self.loader.close()

    def preflight(self) -> bool:
        """The pre-flight step on every worker (collective), then arm the fault handlers;
        False (after reporting why) when the run cannot train."""
        cfg = self.cfg
        error = None
        if cfg.failure.preflight_step:
            error = faults.dry_run_step(
                self.engine,
                cfg.train.micro_batch_size,
                cfg.data.seq_len,
                len(self.tokenizer),
                self.device,
            )
        error = self.first_error(error)
        if error:
            self.stop_run(error)
            return False
        faults.watch_sigterm()
        if cfg.failure.debug_nan_steps and self.rank == 0:
            faults.inject_nan(self.engine.module, cfg.failure.debug_nan_steps, lambda: self.step)
        return True

    def _evaluate(self) -> dict:
        t0 = time.perf_counter()
        metrics = self.evaluator.evaluate(self.engine, self.device, self.sum_over_workers)
        metrics["eval_s"] = time.perf_counter() - t0
        if self.rank == 0:
            log.info(
                "step %d eval: %s",
                self.step,
                ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.count("/") == 2),
            )
        return metrics

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
            "wall_time": time.time(),  # for rates across windows, reports included
            "data_wait_frac": wait_frac,
            # an elastic run's size; workers x micro-batch x accumulation is the global batch
            "workers": self.world,
            "grad_accum": self.engine.gradient_accumulation_steps(),
            **self.faults.metrics(),
            **{f"tokens/{k}": v for k, v in self.loader_state["tokens_per_source"].items()},
        }
        aug = self.loader.counters()
        if aug:  # summed over workers
            keys = sorted(aug)
            values = self.sum_over_workers([float(aug[k]) for k in keys])
            metrics.update({k: round(v) for k, v in zip(keys, values, strict=True)})
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.restore_s is not None:
            metrics["ckpt/restore_s"] = self.mean_over_workers([self.restore_s])[0]
            self.restore_s = None
        if self.ckpt_stats is not None:  # every worker saved at the same step
            write_s, upload_s, size, retries = self.sum_over_workers(self.ckpt_stats)
            metrics.update(
                {
                    "ckpt/write_s": write_s / self.world,
                    "ckpt/upload_s": upload_s / self.world,
                    "ckpt/bytes": size,
                    # S3 requests retried after transient faults (storage.retry_count), summed
                    "ckpt/upload_retries": round(retries),
                }
            )
            self.ckpt_stats = None
        if self.rank == 0:
            log.info("step %(step)d loss %(loss).4f lr %(lr).2e %(tokens_per_s).0f tok/s", metrics)
        return metrics


def train_loop_per_worker(config: dict) -> str | None:
    """Entry point run by every Ray Train worker; ``config`` carries the run config as a dict.
    Returns why the workers stopped the run, if they did (worker 0's is ``Result.return_value``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Ray Train moves each worker into a folder of its own; relative paths in the config mean
    # the driver's folder (which exists here on a local cluster, and as the job's working_dir on
    # every node of a remote one).
    if config.get("cwd") and os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])
    cfg = CPTConfig.model_validate(config["cpt"])
    worker = Worker(cfg, config.get("start_from"), config.get("augment_app"))
    if worker.preflight():
        worker.fit()
    return worker.stopped
