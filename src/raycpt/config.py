"""One typed configuration tree for a raycpt run, loaded and validated once, at the edge.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key fails before any
work starts. Errors are re-raised as :class:`ConfigError`, whose message names the YAML key,
the bad value and what would be valid.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message says which key and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------


class PrepareConfig(_Section):
    """How `raycpt prepare` turns raw text into shards and a manifest."""

    inputs: list[str] = Field(
        min_length=1, description="Files or folders (.txt, .jsonl, .parquet), local or s3://."
    )
    output: str = Field(description="Folder or s3:// prefix that receives shards + manifest.json.")
    text_field: str = Field("text", description="Column / JSON key holding the document text.")
    min_chars: int = Field(32, ge=0, description="Documents shorter than this are dropped.")
    normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    dedup: Literal["exact", "none"] = "exact"
    shard_docs: int = Field(4096, ge=1, description="Target documents per shard.")
    min_shards: int = Field(
        8,
        ge=1,
        description="Split small corpora into at least this many shards so every worker gets some.",
    )
    heldout_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of documents split off into the heldout split."
    )
    seed: int = 0
    on_decode_error: Literal["skip", "fail"] = Field(
        "skip", description="What to do with input that is not valid UTF-8."
    )


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------


class ModelConfig(_Section):
    """The base model: a pretrained folder (or s3:// prefix), or an architecture built from scratch."""

    path: str | None = Field(None, description="Hugging Face model folder or s3:// prefix.")
    tokenizer: str | None = Field(None, description="Tokenizer folder; defaults to model.path.")
    init: dict[str, Any] | None = Field(
        None,
        description="Build the model from scratch from these transformers config fields "
        "(`model_type` required), instead of loading pretrained weights.",
    )
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.init is None):
            raise ValueError("set exactly one of model.path (pretrained) or model.init (scratch)")
        if self.init is not None:
            if "model_type" not in self.init:
                raise ValueError("model.init needs a `model_type` key, e.g. model_type: llama")
            if self.tokenizer is None:
                raise ValueError("model.init builds a new model: set model.tokenizer as well")
        return self

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.path  # type: ignore[return-value]


class WeightPoint(_Section):
    """One point of a piecewise-linear weight schedule, at a fraction of the run."""

    at: float = Field(ge=0.0, le=1.0, description="Fraction of the run (0 = start, 1 = end).")
    weight: float = Field(ge=0.0)


class SourceConfig(_Section):
    """One prepared dataset that the run reads, with its share of tokens."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(description="Prepared dataset folder or s3:// prefix (holds manifest.json).")
    split: str = "train"
    weight: float = Field(1.0, ge=0.0, description="Token share (normalised over all sources).")
    schedule: list[WeightPoint] | None = Field(
        None, description="Piecewise-linear weight over the run; overrides `weight`."
    )

    @model_validator(mode="after")
    def _schedule_sorted(self) -> SourceConfig:
        if self.schedule:
            ats = [p.at for p in self.schedule]
            if ats != sorted(ats):
                raise ValueError(f"schedule points must be sorted by `at`, got {ats}")
        return self


class DataConfig(_Section):
    """Which prepared datasets feed training and how they are streamed and packed."""

    sources: list[SourceConfig] = Field(min_length=1)
    seq_len: int = Field(512, ge=8, description="Tokens per packed training sequence.")
    read_ahead: int = Field(2, ge=1, description="Shards per source held in memory per worker.")
    shuffle: bool = True
    on_exhausted: Literal["repeat", "stop"] = Field(
        "repeat", description="A source that runs out starts a new epoch, or the run stops."
    )
    prefetch_batches: int = Field(4, ge=1, description="Micro-batches prepared ahead per worker.")

    @model_validator(mode="after")
    def _names_unique_and_weighted(self) -> DataConfig:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if all(s.weight == 0 and not s.schedule for s in self.sources):
            raise ValueError("at least one source needs a weight above 0")
        return self


class ScheduleConfig(_Section):
    """The learning-rate schedule. Continued pretraining re-warms then re-decays by default."""

    name: Literal["rewarm_cosine", "wsd", "constant"] = "rewarm_cosine"
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Floor as a fraction of lr.")
    decay_fraction: float = Field(
        0.2, gt=0.0, le=1.0, description="wsd: share of the run spent decaying."
    )
    horizon_steps: int | None = Field(
        None, ge=1, description="Steps the schedule spans; defaults to train.max_steps."
    )


class TrainConfig(_Section):
    """Optimisation: steps, batch sizes, optimizer and schedule."""

    max_steps: int = Field(ge=1)
    micro_batch_size: int = Field(ge=1, description="Sequences per worker per forward pass.")
    global_batch_size: int = Field(
        ge=1,
        description="Sequences per optimizer step over all workers; gradient accumulation "
        "is derived as global / (micro * workers).",
    )
    lr: float = Field(gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0, description="Max global grad norm; 0 disables.")
    schedule: ScheduleConfig = ScheduleConfig()
    log_every: int = Field(10, ge=1, description="Report metrics every N steps.")

    @model_validator(mode="after")
    def _betas_in_range(self) -> TrainConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {list(self.betas)}")
        return self


class DeepSpeedConfig(_Section):
    """DeepSpeed ZeRO settings; `extra` is merged last into the generated DeepSpeed JSON."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 on GPU, fp32 on CPU."
    )
    offload_optimizer: bool = False
    offload_param: bool = False
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedConfig:
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage: 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class CheckpointConfig(_Section):
    """When checkpoints are taken and how many are kept."""

    every_steps: int = Field(100, ge=1)
    num_to_keep: int | None = Field(2, ge=1, description="Checkpoints kept; null keeps all.")


class ScalingConfig(_Section):
    """How many Ray Train workers and what each one asks for."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)


class CPTConfig(_Section):
    """A whole continued-pretraining run."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Run name; reuse it to resume.")
    storage_path: str = Field(description="Where Ray Train keeps checkpoints: folder or s3://.")
    seed: int = 0
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    scaling: ScalingConfig = ScalingConfig()

    @model_validator(mode="after")
    def _batch_divides(self) -> CPTConfig:
        per_step = self.train.micro_batch_size * self.scaling.num_workers
        if self.train.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size x scaling.num_workers ({per_step})"
            )
        return self

    @property
    def grad_accum(self) -> int:
        return self.train.global_batch_size // (
            self.train.micro_batch_size * self.scaling.num_workers
        )

    @property
    def horizon_steps(self) -> int:
        return self.train.schedule.horizon_steps or self.train.max_steps

    def digest(self) -> str:
        """A short, stable hash of the whole config, recorded in checkpoints and manifests."""
        return config_digest(self)


def config_digest(cfg: BaseModel) -> str:
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling against the config reference in README.md"
        elif e["type"] == "missing":
            msg = "required key is missing"
        value = e.get("input")
        shown = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {value!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def parse_config(data: Any, model: type[BaseModel] = CPTConfig, source: str = "<dict>"):
    """Validate a mapping into `model`, raising :class:`ConfigError` with readable messages."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path, model: type[BaseModel] = CPTConfig):
    """Load a YAML file into a validated config object (a :class:`CPTConfig` by default)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return parse_config(data, model, source=str(path))
