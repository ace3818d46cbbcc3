"""Launching a run: connect to (or start) Ray, build the TorchTrainer from the config, fit."""

from __future__ import annotations

import logging
import os

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from raycpt import augment_pool, storage, vocab
from raycpt import checkpoint as ckpt
from raycpt.augment import Augmenter
from raycpt.config import ConfigError, CPTConfig
from raycpt.loader import build_orders
from raycpt.prepare import load_manifest
from raycpt.train import faults
from raycpt.train.engine import check_compatible, load_tokenizer, model_config
from raycpt.train.loop import train_loop_per_worker

log = logging.getLogger(__name__)

# Worker environment. TORCH_EXTENSIONS_DIR caches DeepSpeed's JIT-built ops across runs (the CPU
# shared-memory op takes ~30 s to build). Ray Train's controller polls the workers at the
# health-check interval (default 2 s) and takes one report per worker per poll; a report waits
# while the previous one is unread. 1 s: reports every train.log_every steps (1 s or more apart
# in any real run) never wait, while polling every 0.1 s, as before, cost two CPU workers on 2
# cores ~8 % of each step (Ray's cost 12.6 % -> 4.5 %: BENCHMARKS.md, framework overhead). The
# tests set 0.1 s (tests/conftest.py): they report every few steps of a few milliseconds.
DEFAULT_ENV = {
    "TORCH_EXTENSIONS_DIR": os.path.expanduser("~/.cache/raycpt/torch_extensions"),
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0",
    "TOKENIZERS_PARALLELISM": "false",
    "DS_ACCELERATOR": "",
}


def worker_env(cfg: CPTConfig) -> dict[str, str]:
    """Environment for the train workers: defaults, unless the driver's environment sets them
    (the Helm chart points TORCH_EXTENSIONS_DIR at the pod's scratch volume, for example)."""
    env = {k: os.environ.get(k, v) for k, v in DEFAULT_ENV.items() if v}
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    # Forward the S3 endpoint/region (never credentials: workers get those from their own chain).
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS / `address`, or start a local one."""
    if ray.is_initialized():
        return
    for k, v in DEFAULT_ENV.items():
        if v:
            os.environ.setdefault(k, v)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Logical CPUs above the core count: train workers, the augmentation pool and Ray's own
        # bookkeeping tasks each ask for a CPU and would otherwise wait on each other on 2 cores.
        ray.init(address="local", num_cpus=num_cpus or max(8, os.cpu_count() or 1))


def preflight(cfg: CPTConfig) -> None:
    """Checks that fail in seconds on the driver rather than inside every worker: the datasets
    exist, and (for a local model) tokenizer and model belong together and fit data.seq_len."""
    build_orders(cfg.data, cfg.seed)
    for spec in cfg.eval.sets:
        splits = load_manifest(spec.path)["splits"]
        if spec.split not in splits:
            raise ConfigError(
                f"eval set {spec.name!r}: {spec.path} has no split {spec.split!r} (has "
                f"{sorted(splits)}); prepare it with heldout_fraction > 0"
            )
    if cfg.augment.enabled:
        Augmenter(cfg.augment)  # unreadable lexicon, bad callable, ... fail here
    model_paths = [p for p in (cfg.model.path, cfg.model.tokenizer_path) if p]
    if not any(storage.is_remote(p) for p in model_paths):
        tokenizer = load_tokenizer(cfg.model)
        check_compatible(model_config(cfg.model)[0], tokenizer, cfg.data.seq_len)
        vocab.extend_tokenizer(tokenizer, vocab.domain_terms(cfg.model))  # bad terms fail here
    faults.check_shards(cfg.data)
    if cfg.model.trust_remote_code:
        log.warning(
            "model.trust_remote_code is ON: loading %s will execute Python code shipped with the "
            "model on every worker; turn it off unless you trust its source",
            cfg.model.path or cfg.model.tokenizer_path,
        )
    faults.probe_storage(cfg.storage_path)  # an unwritable bucket fails now, not at step N


def uses_pool(cfg: CPTConfig) -> bool:
    aug = cfg.augment
    return aug.enabled and bool(aug.transforms) and aug.pool.max_actors > 0


def scaling_config(cfg: CPTConfig) -> ray.train.ScalingConfig:
    """Fixed size, or Ray Train's elastic policy: it starts with as many workers as the cluster
    can place (between min_workers and num_workers), restarts on fewer when a node is lost and
    grows back when the autoscaler adds one; every start resumes from the latest checkpoint, and
    the worker loop re-derives gradient accumulation and the data partition from the world size."""
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker, **sc.resources_per_worker}
    if not sc.elastic:
        return ray.train.ScalingConfig(
            num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources
        )
    return ray.train.ScalingConfig(
        num_workers=(sc.min_workers, sc.num_workers),
        use_gpu=sc.use_gpu,
        resources_per_worker=resources,
        elastic_resize_monitor_interval_s=sc.resize_check_s,
    )


def build_trainer(cfg: CPTConfig, start_from: str | None = None) -> TorchTrainer:
    """The TorchTrainer for a run; running it again with the same name resumes."""
    preflight(cfg)
    fs, path = storage.filesystem(cfg.storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cpt": cfg.model_dump(mode="json"),
            "start_from": start_from,
            "cwd": os.getcwd(),
            "augment_app": augment_pool.app_name(cfg.name) if uses_pool(cfg) else None,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.checkpoint.num_to_keep,
                checkpoint_score_attribute=cfg.checkpoint.score_metric,
                checkpoint_score_order=cfg.checkpoint.score_order,
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.failure.max_failures),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
    )


def run(cfg: CPTConfig, start_from: str | None = None) -> ray.train.Result:
    """Train (or resume) the run described by `cfg` and return Ray Train's result (the last
    stage's, for a multi-stage run). `start_from` starts a new run from a checkpoint's weights."""
    if cfg.stages:
        return run_stages(cfg)[-1]
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    init_ray()
    trainer = build_trainer(cfg, start_from)  # pre-flight checks before any pool starts
    app = augment_pool.deploy(cfg.augment, cfg.name) if uses_pool(cfg) else None
    try:
        result = trainer.fit()
    finally:
        if app:
            augment_pool.shutdown(app)
    faults.raise_if_stopped(result)
    if result.metrics and result.metrics.get("preempted"):
        log.warning(
            "run %s was pre-empted (SIGTERM) and checkpointed at step %s: run it again to resume",
            cfg.name,
            result.metrics.get("step"),
        )
    else:
        log.info("run %s finished: %s", cfg.name, result.metrics)
    return result


def stage_configs(cfg: CPTConfig) -> list[CPTConfig]:
    """The run config of every stage: the run's settings with the stage's overrides."""
    out = []
    for stage in cfg.stages or []:
        data = cfg.data.model_copy(update={"sources": stage.sources or cfg.data.sources})
        train = cfg.train.model_copy(
            update={
                "max_steps": stage.max_steps,
                "lr": stage.lr or cfg.train.lr,
                "schedule": stage.schedule or cfg.train.schedule,
            }
        )
        # re-validated as a whole, so a stage cannot produce an invalid run
        out.append(
            CPTConfig.model_validate(
                {
                    **cfg.model_dump(mode="json"),
                    "name": f"{cfg.name}-{stage.name}",
                    "stages": None,
                    "stage": stage.name,
                    "data": data.model_dump(mode="json"),
                    "train": train.model_dump(mode="json"),
                }
            )
        )
    return out


def run_stages(cfg: CPTConfig) -> list[ray.train.Result]:
    """Run the stages in order. A stage that already has checkpoints resumes (an interrupted
    stage); a new one starts from the previous stage's final checkpoint, weights only."""
    results, previous = [], None
    for stage, stage_cfg in zip(cfg.stages or [], stage_configs(cfg), strict=True):
        start = stage.start_from or (ckpt.resolve(run_dir(previous)) if previous else None)
        log.info("stage %s: run %s, starting from %s", stage.name, stage_cfg.name, start)
        results.append(run(stage_cfg, start_from=start))
        previous = stage_cfg
    return results


def run_dir(cfg: CPTConfig) -> str:
    """Where the run's checkpoints live."""
    return storage.join(cfg.storage_path, cfg.name)
