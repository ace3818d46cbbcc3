"""One typed configuration tree for a raycpt run, loaded and validated once, at the edge.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key fails before any
work starts. Errors are re-raised as :class:`ConfigError`, whose message names the YAML key,
the bad value and what would be valid.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message says which key and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Section):
    """Object-storage endpoint and region; credentials always come from the standard AWS chain
    (environment, profile, web identity / IRSA), never from this file."""

    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, Ceph RGW, R2, GCS interop), e.g. "
        "http://minio:9000; default: AWS_ENDPOINT_URL or AWS itself.",
        pattern=r"^https?://",
    )
    region: str | None = Field(None, description="Default: AWS_REGION / the profile's region.")


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------


class QualityConfig(_Section):
    """Heuristic quality filters; each is off while its value is null, and each drop is counted
    under its own reason in the manifest."""

    max_chars: int | None = Field(None, ge=1, description="Drop documents longer than this.")
    min_alpha_ratio: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Drop documents whose share of letters among non-space characters is lower "
        "(tables of numbers, markup, symbol soup).",
    )
    max_repeated_line_ratio: float | None = Field(
        None, ge=0.0, le=1.0, description="Drop documents whose share of repeated lines is higher."
    )
    max_repeated_ngram_ratio: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Drop documents whose share of repeated word n-grams is higher (boilerplate, "
        "generation loops).",
    )
    ngram_size: int = Field(3, ge=1, description="n of max_repeated_ngram_ratio's word n-grams.")
    languages: list[str] | None = Field(
        None,
        min_length=1,
        description="Keep only documents identified (py3langid, ISO 639-1) as one of these, "
        "e.g. [en, de].",
    )
    min_language_score: float = Field(
        0.5, ge=0.0, le=1.0, description="Probability the identified language needs to reach."
    )
    user_filter: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="module:function called with each cleaned text; returns True to keep, "
        "False (counted as user_filter) or a string reason to drop.",
    )


class PiiConfig(_Section):
    """Personal data replaced by typed placeholders (<EMAIL>, <PHONE>, ...) before anything else
    sees the text; counts per type go in the manifest."""

    enabled: bool = Field(False, description="Redact PII.")
    types: list[Literal["email", "phone", "ip_address", "credit_card"]] = Field(
        ["email", "phone", "ip_address", "credit_card"],
        description="Built-in detectors to run (credit cards are Luhn-checked).",
    )
    patterns: dict[str, str] = Field(
        {},
        description="Extra regexes by type name, e.g. {mrn: 'MRN[: ]*\\d{6,10}'} (-> <MRN>).",
    )
    max_density: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Drop documents in which redactions cover more than this share of characters.",
    )

    @model_validator(mode="after")
    def _patterns_compile(self) -> PiiConfig:
        for name, pattern in self.patterns.items():
            if not re.fullmatch(r"[A-Za-z_]\w*", name):
                raise ValueError(f"pii.patterns: name {name!r} must be a word like mrn")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"pii.patterns.{name}: not a valid regex ({err})") from None
        return self


class NearDedupConfig(_Section):
    """Near-duplicate removal with MinHash signatures and locality-sensitive hashing over the
    whole corpus; one document (the smallest id) is kept per cluster."""

    enabled: bool = Field(False, description="Remove near-duplicates.")
    threshold: float = Field(
        0.8, gt=0.0, lt=1.0, description="Jaccard similarity of shingle sets that counts as a copy."
    )
    shingle_size: int = Field(
        5, ge=1, description="Characters per shingle (character n-grams survive small edits)."
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (signature size).")
    seed: int = Field(1, description="Seed of the MinHash permutations.")


class PrepareConfig(_Section):
    """How `raycpt prepare` turns raw text into shards and a manifest."""

    inputs: list[str] = Field(
        min_length=1, description="Files or folders (.txt, .jsonl, .parquet), local or s3://."
    )
    output: str = Field(description="Folder or s3:// prefix that receives shards + manifest.json.")
    text_field: str = Field("text", description="Column / JSON key holding the document text.")
    min_chars: int = Field(32, ge=0, description="Documents shorter than this are dropped.")
    normalization: Literal["NFC", "NFKC", "none"] = Field("NFC", description="Unicode form.")
    dedup: Literal["exact", "none"] = Field("exact", description="Drop exact duplicates.")
    shard_docs: int = Field(4096, ge=1, description="Target documents per shard.")
    min_shards: int = Field(
        8,
        ge=1,
        description="Split small corpora into at least this many shards so every worker gets some.",
    )
    heldout_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of documents split off into the heldout split."
    )
    seed: int = Field(0, description="Seed of the held-out split.")
    on_decode_error: Literal["skip", "fail"] = Field(
        "skip", description="What to do with input that is not valid UTF-8."
    )
    storage: StorageConfig = StorageConfig()
    difficulty: Literal["none", "length", "rarity", "field"] = Field(
        "none",
        description="Curriculum score per document (rarity: mean surprisal of its words in the "
        "corpus); shards are then written from easiest to hardest.",
    )
    difficulty_field: str | None = Field(None, description="JSON key / column for 'field'.")
    group_field: str | None = Field(
        None, description="JSON key / column kept as the document's sub-population (group)."
    )
    quality: QualityConfig = QualityConfig()
    pii: PiiConfig = PiiConfig()
    near_dedup: NearDedupConfig = NearDedupConfig()
    engine: Literal["auto", "local", "ray"] = Field(
        "auto",
        description="ray: read, clean, filter and write in parallel with Ray Data; local: one "
        "process; auto: ray when connected to a Ray cluster and there are 64+ input files.",
    )
    workers: int | None = Field(
        None, ge=1, description="Ray engine: parallel curation actors; default: the cluster's CPUs."
    )

    @model_validator(mode="after")
    def _field_given(self) -> PrepareConfig:
        if self.difficulty == "field" and not self.difficulty_field:
            raise ValueError("difficulty: field needs difficulty_field")
        return self


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------


class LoraConfig(_Section):
    """Train low-rank adapters (peft LoRA) instead of the full model; the base stays frozen."""

    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0.0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names (suffixes) that get adapters, or all-linear.",
    )
    trainable_embeddings: Literal["none", "new_tokens", "all"] = Field(
        "new_tokens",
        description="Embedding rows trained besides the adapters: new_tokens = only the rows of "
        "added tokens (input and output; peft trainable_token_indices), all = the whole input "
        "and output embeddings (peft modules_to_save). Both work at every ZeRO stage.",
    )


class ModelConfig(_Section):
    """The base model: a pretrained folder (or s3:// prefix), or an architecture built anew."""

    path: str | None = Field(None, description="Hugging Face model folder or s3:// prefix.")
    tokenizer: str | None = Field(None, description="Tokenizer folder; defaults to model.path.")
    init: dict[str, Any] | None = Field(
        None,
        description="Build the model from scratch from these transformers config fields "
        "(`model_type` required), instead of loading pretrained weights.",
    )
    trust_remote_code: bool = Field(
        False, description="Run code shipped with the model (off: loading never executes code)."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer (regional compilation; GPU)."
    )
    loss_chunk_tokens: int | None = Field(
        None,
        ge=256,
        description="Compute the loss in chunks of this many tokens, recomputed in backward, so "
        "the fp32 copy of the whole [tokens, vocab] logits is never held (large vocabularies).",
    )
    add_tokens: list[str] = Field(
        default_factory=list,
        description="Domain terms added to the tokenizer as single tokens (in their mid-sentence "
        "form, after a space); each new input and output embedding row starts as the mean of "
        "the rows of the pieces the term used to split into. `raycpt vocab` proposes them.",
    )
    vocab_file: str | None = Field(
        None,
        description="File (local or s3://) with one term per line, added after add_tokens; "
        "blank lines and lines starting with # are skipped (`raycpt vocab --out` writes one).",
    )
    vocab_pad_multiple: int = Field(
        64, ge=1, description="When terms grow the vocabulary, pad its size to a multiple of this."
    )
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters (peft) only.")

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

    @model_validator(mode="after")
    def _terms_clean(self) -> ModelConfig:
        for term in self.add_tokens:
            if not term.strip() or term != term.strip():
                raise ValueError(
                    f"model.add_tokens: {term!r} is empty or has surrounding spaces; write the "
                    "bare term (raycpt adds the leading space itself)"
                )
        dupes = sorted({t for t in self.add_tokens if self.add_tokens.count(t) > 1})
        if dupes:
            raise ValueError(f"model.add_tokens: {dupes} listed more than once")
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

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Source name in metrics.")
    path: str = Field(description="Prepared dataset folder or s3:// prefix (holds manifest.json).")
    split: str = Field("train", description="Manifest split to train on.")
    weight: float = Field(1.0, ge=0.0, description="Token share (normalised over all sources).")
    schedule: list[WeightPoint] | None = Field(
        None, description="Piecewise-linear weight over the run; overrides `weight`."
    )
    group_weights: dict[str, Annotated[float, Field(ge=0.0)]] = Field(
        default_factory=dict,
        description="Up/down-weight documents by their group (prepare's group_field): each is "
        "seen w times on average per epoch (e.g. {rare_subdomain: 3.0, boilerplate: 0.5}).",
    )

    @model_validator(mode="after")
    def _schedule_sorted(self) -> SourceConfig:
        if self.schedule:
            ats = [p.at for p in self.schedule]
            if ats != sorted(ats):
                raise ValueError(f"schedule points must be sorted by `at`, got {ats}")
        return self


class CurriculumConfig(_Section):
    """Train from easier to harder documents (needs a dataset prepared with `difficulty`)."""

    enabled: bool = False
    randomness: float = Field(
        0.1, ge=0.0, le=1.0, description="0 = strictly by difficulty, 1 = as good as shuffled."
    )


class DataConfig(_Section):
    """Which prepared datasets feed training and how they are streamed and packed."""

    sources: list[SourceConfig] = Field(min_length=1)
    seq_len: int = Field(512, ge=8, description="Tokens per packed training sequence.")
    read_ahead: int = Field(2, ge=1, description="Shards per source held in memory per worker.")
    shuffle: bool = Field(True, description="Seeded shard and row order per epoch.")
    on_exhausted: Literal["repeat", "stop"] = Field(
        "repeat", description="A source that runs out starts a new epoch, or the run stops."
    )
    prefetch_batches: int = Field(4, ge=1, description="Micro-batches prepared ahead per worker.")
    curriculum: CurriculumConfig = CurriculumConfig()
    log_documents: bool = Field(
        False,
        description="Record (document id, epoch) of every document trained on in checkpoints "
        "(`raycpt inspect --documents`): an exact audit of what the model saw.",
    )

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

    name: Literal["rewarm_cosine", "wsd", "constant"] = Field(
        "rewarm_cosine", description="constant = the base model's final LR, no warm-up."
    )
    warmup_steps: int = Field(100, ge=0, description="Linear re-warm-up from 0.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Floor as a fraction of lr.")
    decay_fraction: float = Field(
        0.2, gt=0.0, le=1.0, description="wsd: share of the run spent decaying."
    )
    horizon_steps: int | None = Field(
        None, ge=1, description="Steps the schedule spans; defaults to train.max_steps."
    )


class TrainConfig(_Section):
    """Optimisation: steps, batch sizes, optimizer and schedule."""

    max_steps: int = Field(ge=1, description="Optimizer steps of the run.")
    micro_batch_size: int = Field(ge=1, description="Sequences per worker per forward pass.")
    global_batch_size: int = Field(
        ge=1,
        description="Sequences per optimizer step over all workers; gradient accumulation "
        "is derived as global / (micro * workers).",
    )
    lr: float = Field(gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW decay (not on norms, biases).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
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

    zero_stage: Literal[0, 1, 2, 3] = Field(
        2,
        description=(
            "ZeRO partitioning stage: 1 shards the optimizer state, 2 also the gradients, 3 also "
            "the weights. With gradient accumulation, 1 reduces gradients once per step and 2 "
            "after every micro-batch: take 1 when a full gradient fits on each GPU "
            "(BENCHMARKS.md), 3 when the weights do not."
        ),
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 on GPU, fp32 on CPU."
    )
    offload_optimizer: bool = Field(False, description="Optimizer state in CPU memory.")
    offload_param: bool = Field(False, description="ZeRO-3 parameters in CPU memory.")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Raw DeepSpeed config merged over the generated one."
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedConfig:
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage: 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class FailureConfig(_Section):
    """What happens when a worker dies, is pre-empted (SIGTERM), or a step goes non-finite."""

    max_failures: int = Field(
        3,
        ge=-1,
        description="Restarts of the worker group from the latest checkpoint (-1: no limit).",
    )
    preflight_step: bool = Field(
        True,
        description="One forward and backward pass at train.micro_batch_size x data.seq_len "
        "before the first step, so an out-of-memory or shape error fails at once.",
    )
    on_nan: Literal["skip", "rollback", "stop"] = Field(
        "stop",
        description="A NaN/Inf loss or gradient norm on any worker: skip = the update is not "
        "applied (DeepSpeed discards it; the LR schedule does not advance); rollback = reload "
        "the latest checkpoint and go on with LR x rollback_lr_factor (the data stream goes on, "
        "the batches since that checkpoint are not replayed); stop = end the run with an error "
        "naming the step (nothing is saved after the last good checkpoint).",
    )
    max_nonfinite_steps: int = Field(
        10, ge=0, description="Non-finite steps skipped or rolled back before the run stops."
    )
    rollback_lr_factor: float = Field(
        0.5, gt=0.0, le=1.0, description="LR multiplier applied at each rollback (compounds)."
    )
    debug_nan_steps: list[int] = Field(
        default_factory=list,
        description="Debugging/testing on_nan: worker 0's loss is made NaN at these steps (once "
        "each per worker process). Leave empty in real runs.",
    )


class CheckpointConfig(_Section):
    """When checkpoints are taken and how many are kept."""

    every_steps: int = Field(100, ge=1, description="Checkpoint every N steps (and at the end).")
    num_to_keep: int | None = Field(
        2,
        ge=1,
        description="Checkpoints kept (the best ones when score_metric is set, plus always the "
        "latest, which resume needs); null keeps all.",
    )
    score_metric: str | None = Field(
        None,
        description="Metric that ranks checkpoints, e.g. eval/domain/ppl; `export --best` "
        "picks by it. Needs eval.every_steps dividing every_steps.",
    )
    score_order: Literal["min", "max"] = Field("min", description="Lower or higher is better.")


class EvalSetConfig(_Section):
    """One held-out evaluation set: a prepared dataset's split, in the domain or general role."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Set name in metrics.")
    path: str = Field(description="Prepared dataset folder or s3:// prefix.")
    split: str = Field("heldout", description="Manifest split (prepare's heldout_fraction).")
    role: Literal["domain", "general"] = Field(
        description="domain: what the run should gain; general: what it must not forget."
    )
    max_tokens: int = Field(32768, ge=1, description="Tokens evaluated (bounds the cost).")


class EarlyStopConfig(_Section):
    """When periodic evaluation ends the run early."""

    patience: int = Field(
        0, ge=0, description="Evaluations without improvement before stopping; 0: never."
    )
    metric: str = Field("eval/domain/ppl", description="Metric watched for improvement.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    min_delta: float = Field(
        0.0, ge=0.0, description="Relative change that counts as an improvement (0.01 = 1%)."
    )
    forgetting_budget: float | None = Field(
        None,
        gt=0.0,
        description="Stop once general perplexity exceeds the base model's by this fraction "
        "(0.1 = +10%).",
    )


class EvalConfig(_Section):
    """Periodic held-out evaluation inside the training loop, sharded over the workers."""

    sets: list[EvalSetConfig] = Field(default_factory=list)
    every_steps: int = Field(0, ge=0, description="Evaluate every N steps; 0: start and end only.")
    batch_size: int | None = Field(None, ge=1, description="Blocks per forward; default micro.")
    calibration_bins: int = Field(15, ge=2, description="Confidence bins of the ECE.")
    early_stop: EarlyStopConfig = EarlyStopConfig()

    @model_validator(mode="after")
    def _names_unique(self) -> EvalConfig:
        names = [s.name for s in self.sets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval set names must be unique, got {names}")
        return self


class StrengthPoint(_Section):
    """One point of a piecewise-linear strength schedule, at a fraction of the run."""

    at: float = Field(ge=0.0, le=1.0)
    strength: float = Field(ge=0.0)


class _TransformBase(_Section):
    name: str | None = Field(None, description="Name in metrics; defaults to the type.")
    p: float = Field(0.5, ge=0.0, le=1.0, description="Probability that a document is touched.")
    schedule: list[StrengthPoint] | None = Field(
        None, description="Strength over the run (multiplies rates); default constant 1."
    )
    off_after: float | None = Field(
        None, ge=0.0, le=1.0, description="Switch the transform off after this fraction."
    )

    @property
    def label(self) -> str:
        return self.name or self.type  # type: ignore[attr-defined]


class LexiconTransform(_TransformBase):
    """Whole-word, case-preserving substitution from a domain lexicon (synonyms, abbreviations)."""

    type: Literal["lexicon"]
    path: str = Field(
        description="Lexicon file: one group of equivalent terms per line, '|'-separated."
    )
    rate: float = Field(0.3, ge=0.0, le=1.0, description="Share of matches replaced.")


class NoiseTransform(_TransformBase):
    """Keyboard typos, OCR confusions, casing and whitespace variation at a bounded rate."""

    type: Literal["noise"]
    rate: float = Field(0.01, ge=0.0, le=0.2, description="Max edited share of characters.")
    kinds: list[Literal["typo", "ocr", "case", "whitespace"]] = [
        "typo",
        "ocr",
        "case",
        "whitespace",
    ]


class FormatTransform(_TransformBase):
    """Numbers, dates and units rewritten in their common alternative forms."""

    type: Literal["format"]
    rate: float = Field(0.5, ge=0.0, le=1.0, description="Share of matches rewritten.")
    kinds: list[Literal["numbers", "dates", "units"]] = ["numbers", "dates", "units"]


class SentenceTransform(_TransformBase):
    """Drop or swap independent sentences within a bounded window."""

    type: Literal["sentence"]
    drop_rate: float = Field(0.05, ge=0.0, le=0.5, description="Share of sentences dropped.")
    swap_rate: float = Field(0.1, ge=0.0, le=1.0, description="Share of sentences moved.")
    window: int = Field(2, ge=1, description="Max positions a sentence moves.")


class CustomTransform(_TransformBase):
    """A user's callable ``f(text, rng, strength, **params) -> (text, edits)``."""

    type: Literal["custom"]
    callable: str = Field(pattern=r"^[\w.]+:[\w]+$", description="module.path:function")
    params: dict[str, Any] = Field(default_factory=dict)


TransformConfig = Annotated[
    LexiconTransform | NoiseTransform | FormatTransform | SentenceTransform | CustomTransform,
    Field(discriminator="type"),
]


class PoolConfig(_Section):
    """The autoscaling Ray actor pool (a Ray Serve deployment) that runs the transforms."""

    min_actors: int = Field(1, ge=0)
    max_actors: int = Field(2, ge=0, description="0 runs the transforms inside each worker.")
    cpus_per_actor: float = Field(1.0, gt=0.0)
    resources: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources, e.g. {augment: 1} (Helm chart)."
    )
    target_ongoing_requests: float = Field(2.0, gt=0.0, description="Per actor, for autoscaling.")
    batch_docs: int = Field(64, ge=1, description="Documents per request.")
    downscale_delay_s: float = Field(30.0, ge=0.0)
    upscale_delay_s: float = Field(2.0, ge=0.0)

    @model_validator(mode="after")
    def _min_le_max(self) -> PoolConfig:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors {self.min_actors} > max_actors {self.max_actors}")
        return self


class EmbeddingNoiseConfig(_Section):
    """NEFTune: uniform noise on input embeddings in training steps only, alpha / sqrt(L * d)."""

    alpha: float = Field(0.0, ge=0.0, description="0 disables; NEFTune used 5-15.")
    schedule: list[StrengthPoint] | None = None
    off_after: float | None = Field(None, ge=0.0, le=1.0)


class AugmentConfig(_Section):
    """Domain-targeted augmentation between the shard reader and tokenization."""

    enabled: bool = False
    seed: int = Field(0, description="With doc id and epoch, fixes every augmented text.")
    protected_terms: list[str] = Field(default_factory=list, description="Never changed.")
    protected_file: str | None = Field(None, description="One protected term per line.")
    transforms: list[TransformConfig] = Field(default_factory=list)
    pool: PoolConfig = PoolConfig()
    embedding_noise: EmbeddingNoiseConfig = EmbeddingNoiseConfig()


class ScalingConfig(_Section):
    """How many Ray Train workers and what each one asks for."""

    num_workers: int = Field(
        1, ge=1, description="Ray Train workers (one per GPU); the most an elastic run uses."
    )
    min_workers: int | None = Field(
        None,
        ge=1,
        description="Elastic training: with fewer than num_workers placeable (nodes lost, spot "
        "capacity reclaimed) the run goes on with as few as min_workers, and grows back when "
        "capacity returns. Each resize restarts the workers from the latest checkpoint with the "
        "same global batch (gradient accumulation absorbs the change). Unset: fixed size.",
    )
    resize_check_s: float = Field(
        60.0,
        gt=0.0,
        description="Elastic training: how often a running group looks for room to grow.",
    )
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL; else CPU and gloo.")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs each worker reserves.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources per worker."
    )

    @model_validator(mode="after")
    def _min_below_max(self) -> ScalingConfig:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(
                f"scaling.min_workers ({self.min_workers}) must not exceed scaling.num_workers "
                f"({self.num_workers})"
            )
        return self

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    @property
    def worker_counts(self) -> list[int]:
        """Every worker count the run may train with."""
        low = self.min_workers if self.elastic else self.num_workers
        return list(range(low, self.num_workers + 1))


class StageConfig(_Section):
    """One named stage of a multi-stage run; unset fields keep the run's own settings."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    max_steps: int = Field(ge=1, description="Optimizer steps of this stage.")
    sources: list[SourceConfig] | None = Field(None, description="This stage's data mix.")
    lr: float | None = Field(None, gt=0.0, description="Peak LR of this stage.")
    schedule: ScheduleConfig | None = Field(None, description="LR schedule of this stage.")
    start_from: str | None = Field(
        None, description="Checkpoint to start from; default: the previous stage's last one."
    )


class CPTConfig(_Section):
    """A whole continued-pretraining run."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Run name; reuse it to resume.")
    storage_path: str = Field(description="Where Ray Train keeps checkpoints: folder or s3://.")
    seed: int = Field(0, description="Seeds data order and initialisation.")
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    failure: FailureConfig = FailureConfig()
    scaling: ScalingConfig = ScalingConfig()
    storage: StorageConfig = StorageConfig()
    augment: AugmentConfig = AugmentConfig()
    eval: EvalConfig = EvalConfig()
    stages: list[StageConfig] | None = Field(
        None,
        description="Run as a sequence of stages; each starts from the previous stage's final "
        "weights with fresh optimizer, scheduler and data state (run <name>-<stage>).",
    )
    stage: str | None = Field(None, description="Set by the stage runner; recorded in checkpoints.")

    @model_validator(mode="after")
    def _stage_names_unique(self) -> CPTConfig:
        names = [s.name for s in self.stages or []]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return self

    @model_validator(mode="after")
    def _skip_needs_zero(self) -> CPTConfig:
        if self.failure.on_nan == "skip" and self.deepspeed.zero_stage == 0:
            raise ValueError(
                "failure.on_nan: skip relies on DeepSpeed's ZeRO optimizer to discard a "
                "non-finite step; with deepspeed.zero_stage 0 use on_nan: rollback or stop"
            )
        return self

    @model_validator(mode="after")
    def _batch_divides(self) -> CPTConfig:
        """Every worker count the run may use must split the global batch evenly: that is what
        keeps the optimisation the same when an elastic run shrinks or grows."""
        micro, total = self.train.micro_batch_size, self.train.global_batch_size
        counts = self.scaling.worker_counts
        bad = [w for w in counts if total % (micro * w)]
        if not bad:
            return self
        if len(counts) == 1:
            raise ValueError(
                f"train.global_batch_size ({total}) must be a multiple of "
                f"train.micro_batch_size x scaling.num_workers ({micro * counts[0]})"
            )
        step = micro * math.lcm(*counts)
        raise ValueError(
            f"train.global_batch_size ({total}) is not a multiple of train.micro_batch_size x "
            f"workers for the elastic worker counts {bad} (scaling.min_workers.."
            f"num_workers = {counts[0]}..{counts[-1]}): the global batch could not be held "
            f"there. Use a global_batch_size that is a multiple of {step} (e.g. "
            f"{-(-total // step) * step}), or narrow the range"
        )

    @model_validator(mode="after")
    def _eval_feeds_scores(self) -> CPTConfig:
        """A checkpoint's score must be a fresh evaluation, and early stopping needs sets."""
        watched = [m for m in (self.checkpoint.score_metric,) if m] + (
            [self.eval.early_stop.metric] if self.eval.early_stop.patience else []
        )
        if (watched or self.eval.early_stop.forgetting_budget) and not self.eval.sets:
            raise ValueError(
                "checkpoint.score_metric and eval.early_stop need eval.sets: name at least "
                "one held-out set"
            )
        every = self.eval.every_steps
        if self.checkpoint.score_metric and (not every or self.checkpoint.every_steps % every):
            raise ValueError(
                f"checkpoint.score_metric needs eval.every_steps ({every}) to divide "
                f"checkpoint.every_steps ({self.checkpoint.every_steps}), so that every "
                "checkpoint is scored by a fresh evaluation"
            )
        roles = {s.role for s in self.eval.sets}
        if self.eval.early_stop.forgetting_budget and "general" not in roles:
            raise ValueError("eval.early_stop.forgetting_budget needs a set with role: general")
        return self

    @property
    def grad_accum(self) -> int:
        """Gradient accumulation at scaling.num_workers (an elastic run re-derives it from the
        worker count it has, so that the global batch stays the same)."""
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


def _type_name(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = text.replace("typing.", "").replace("raycpt.config.", "")
    return text.replace(" | ", " or ").replace("|", " or ")


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (list[...], X | None, Annotated unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def reference(model: type[BaseModel] = CPTConfig, prefix: str = "") -> list[str]:
    """Markdown table rows (key | type | default | meaning) for every field, recursively."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        nested = _models_in(ann)
        if nested:
            is_list = get_origin(ann) is list
            for sub in nested:
                doc = (sub.__doc__ or "").strip().splitlines()[0]
                tag = sub.model_fields.get("type")
                label = f"{key}[type={get_args(tag.annotation)[0]}]" if tag else key
                label += "[]" if is_list and not tag else ""
                rows.append(f"| `{label}` | section | | {doc} |")
                rows.extend(reference(sub, label + "."))
            continue
        default = (
            "required"
            if field.is_required()
            else f"`{field.get_default(call_default_factory=True)!r}`"
        )
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | {_type_name(ann)} | {default} | {desc} |")
    return rows


def reference_markdown() -> str:
    """The config reference section of README.md, generated from the classes above."""
    head = ["| key | type | default | meaning |", "|---|---|---|---|"]
    run = "\n".join(head + reference(CPTConfig))
    prep = "\n".join(head + reference(PrepareConfig))
    return (
        f"### Run config (`raycpt train`, `ray_jobs/cpt.py`)\n\n{run}\n\n"
        f"### Prepare config (`raycpt prepare --config`)\n\n{prep}\n"
    )
