"""Building the model, tokenizer and DeepSpeed engine of one worker from the config."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch

from raycpt import storage, vocab
from raycpt.config import CPTConfig, DeepSpeedConfig, ModelConfig, TrainConfig
from raycpt.train import adapters
from raycpt.train.schedule import lr_multiplier

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """The base model or tokenizer cannot be used for this run; the message says why."""


def resolve_precision(ds: DeepSpeedConfig, use_gpu: bool) -> str:
    if ds.precision != "auto":
        return ds.precision
    return "bf16" if use_gpu else "fp32"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: CPTConfig, precision: str, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run; ``deepspeed.extra`` is merged in last."""
    ds = cfg.deepspeed
    grad_accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * world_size)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        zero.update(overlap_comm=True, contiguous_gradients=True)
    if ds.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # We pass a torch optimizer (no op compilation needed); DeepSpeed only vouches for its own.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, ds.extra)


def _lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "w")  # noqa: SIM115 - held for the lock's lifetime
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def cache_dir() -> str:
    """The node-local cache (RAYCPT_CACHE_DIR; the Helm chart points it at the pod's scratch)."""
    return os.environ.get("RAYCPT_CACHE_DIR", os.path.expanduser("~/.cache/raycpt"))


def build_once(dest: str, build: Callable[[str], None]) -> str:
    """The folder ``dest``, made by ``build(staging)`` unless it already exists.

    Several workers on one node share one build: the first takes a file lock and builds into a
    staging folder that is renamed into place when complete; the others wait on the lock and
    find the finished folder. A build that died half-way leaves only a staging folder behind.
    """
    lock = _lock(dest + ".lock")
    try:
        if not os.path.isdir(dest):
            staging = dest + ".partial"
            shutil.rmtree(staging, ignore_errors=True)
            build(staging)
            os.replace(staging, dest)
    finally:
        lock.close()
    return dest


def local_copy(uri: str) -> str:
    """A local folder holding ``uri``: itself if local, else a node-wide cached download
    (one per node, see `build_once`). The cache key covers every object's ETag, so a changed
    model is downloaded again."""
    if not storage.is_remote(uri):
        return storage.filesystem(uri)[1]
    objects = storage.list_objects(uri)
    if not objects:
        raise ModelError(f"{uri}: no objects under this prefix; check model.path")
    key = hashlib.sha256(json.dumps([uri, objects]).encode()).hexdigest()[:20]
    dest = os.path.join(cache_dir(), "models", key)
    return build_once(dest, lambda staging: storage.download_dir(uri, staging))


def load_tokenizer(model_cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = local_copy(model_cfg.tokenizer_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"model.tokenizer: cannot load a tokenizer from {path}: {err}") from None
    if tok.eos_token_id is None:
        raise ModelError(f"model.tokenizer: the tokenizer at {path} has no eos_token")
    return tok


def model_config(model_cfg: ModelConfig):
    """The transformers config of the model, and its local folder (None when built from init)."""
    from transformers import AutoConfig

    if model_cfg.init is not None:
        init = dict(model_cfg.init)
        return AutoConfig.for_model(init.pop("model_type"), **init), None
    path = local_copy(model_cfg.path)  # type: ignore[arg-type]
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"model.path: {path} is not a Hugging Face model folder: {err}") from None
    return config, path


def check_compatible(config, tokenizer, seq_len: int) -> None:
    """Refuse a model that is not a causal LM, a tokenizer/model vocabulary mismatch and a
    sequence longer than the model allows."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    # models with their own code (auto_map) name their classes themselves
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not getattr(config, "auto_map", None):
        raise ModelError(
            f"model: a {config.model_type!r} model is not a causal language model "
            "(AutoModelForCausalLM cannot load it); point model.path at a decoder-only LM "
            "(llama, mistral, qwen2, gpt2, ...)"
        )
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ModelError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}: "
            "they do not belong together; point model.tokenizer at the model's own tokenizer"
        )
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ModelError(
            f"data.seq_len {seq_len} exceeds the model's max_position_embeddings ({limit}); "
            f"set data.seq_len <= {limit}"
        )


def build_model(model_cfg: ModelConfig, tokenizer, seq_len: int, dtype: torch.dtype):
    """The causal LM, loaded (or initialised) directly in the active DeepSpeed ZeRO-3 context.

    With ZeRO-3 the caller must hold a live ``HfDeepSpeedConfig`` first: ``transformers`` then
    creates every parameter already partitioned, so no worker ever holds the whole model.
    The run's domain terms (``model.add_tokens`` / ``vocab_file``) are added to `tokenizer` in
    place and to the model's embeddings; with ``model.lora`` the model comes back peft-wrapped.
    """
    from transformers import AutoModelForCausalLM

    if model_cfg.trust_remote_code:
        log.warning("model.trust_remote_code is ON: code shipped with the model will be executed")
    config, path = model_config(model_cfg)
    check_compatible(config, tokenizer, seq_len)
    new_tokens = vocab.extend_tokenizer(tokenizer, vocab.domain_terms(model_cfg))
    kwargs = {"dtype": dtype, "attn_implementation": model_cfg.attn_implementation}
    try:
        if path is None:
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, trust_remote_code=model_cfg.trust_remote_code, **kwargs
            )
    except ValueError as err:
        raise ModelError(
            f"model: cannot build a causal LM from {path or 'model.init'}: {err}"
        ) from None
    vocab.init_new_embeddings(model, new_tokens, model_cfg.vocab_pad_multiple)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if model_cfg.loss_chunk_tokens:
        model.loss_function = functools.partial(
            chunked_causal_lm_loss, chunk=model_cfg.loss_chunk_tokens
        )
    if model_cfg.lora:
        if model_cfg.gradient_checkpointing:  # frozen embeddings: recompute needs a grad path
            model.enable_input_require_grads()
        model = adapters.apply_lora(model, model_cfg.lora, sorted(new_tokens))
    if model_cfg.compile:
        compile_layers(model)
    return model


def chunked_causal_lm_loss(
    logits,
    labels,
    vocab_size: int,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels=None,
    chunk: int = 4096,
    **kwargs,
):
    """transformers' causal-LM loss (same value), without its fp32 copy of all logits.

    The stock loss upcasts the whole [batch x seq, vocab] logits to fp32 and autograd keeps that
    copy for backward: 8.4 GB at 8 x 2048 tokens and a 128k vocabulary. Here each chunk is
    upcast inside a checkpoint, so only one chunk's fp32 logits exist at a time.
    """
    from torch.utils.checkpoint import checkpoint

    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    flat = logits.reshape(-1, vocab_size)
    target = shift_labels.reshape(-1).to(flat.device)

    def part(x, y):
        return torch.nn.functional.cross_entropy(
            x.float(), y, ignore_index=ignore_index, reduction="sum"
        )

    total = sum(
        checkpoint(part, flat[i : i + chunk], target[i : i + chunk], use_reentrant=False)
        for i in range(0, flat.shape[0], chunk)
    )
    count = num_items_in_batch if num_items_in_batch is not None else (target != ignore_index).sum()
    return total / count


def compile_layers(model) -> int:
    """torch.compile every repeated block (decoder layer) in place; returns how many.

    Regional compilation: the layers are identical, so inductor compiles one graph and reuses
    it, which keeps compile time to tens of seconds even for deep models, and fuses the
    elementwise work (RMSNorm's fp32 upcast, SwiGLU, rotary) that dominates eager time.
    """
    blocks = getattr(getattr(model, "model", model), "layers", None)
    if blocks is None:
        raise ModelError("model.compile: this architecture has no `model.layers` to compile")
    for block in blocks:
        block.compile()
    return len(blocks)


def build_optimizer(model, train: TrainConfig, horizon: int, fused: bool):
    """AdamW without weight decay on biases and norms, and the LR schedule as a LambdaLR."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 parameters are flat shards
            (no_decay if ndim < 2 or "norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # ZeRO drops empty groups (LoRA trains no norms): the LR schedule must see the same groups
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, eps=train.eps, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(train.schedule, horizon))
    return opt, sched
