"""LoRA continued pretraining through peft: the base model frozen, low-rank adapters (and,
optionally, embedding rows) trained, in the same DeepSpeed engine and Ray Train loop.

The adapter's peft config is saved with every checkpoint (``hf/adapter_config.json``), so
export rebuilds the same wrapped model without the run config.
"""

from __future__ import annotations

import contextlib

from raycpt import vocab
from raycpt.config import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def peft_config(cfg: LoraConfig, model, new_token_ids: list[int]):
    """The peft LoraConfig for `cfg`, naming the model's own embedding modules."""
    import peft

    emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = emb_out is not None and emb_out.weight is emb_in.weight
    names = [_module_name(model, emb_in)]
    if emb_out is not None and not tied:
        names.append(_module_name(model, emb_out))
    extra: dict = {}
    if cfg.trainable_embeddings == "all":
        extra = {"modules_to_save": names, "ensure_weight_tying": tied}
    elif cfg.trainable_embeddings == "new_tokens" and new_token_ids:
        # tied output embeddings follow the input rows by themselves (peft ties the adapter)
        extra = {"trainable_token_indices": {n: list(new_token_ids) for n in names}}
    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        **extra,
    )


def apply_lora(model, cfg: LoraConfig, new_token_ids: list[int]):
    """`model` wrapped by peft: only adapters (and the chosen embedding rows) require grad.

    Under ZeRO-3 (parameters already partitioned) the trainable token rows need the two
    fixes below; everything else of peft works on partitioned parameters as it is."""
    import peft

    config = peft_config(cfg, model, new_token_ids)
    if not vocab.partitioned(model.parameters()):
        return peft.get_peft_model(model, config)
    with _token_rows_initialised_gathered(model):
        model = peft.get_peft_model(model, config)
    _gather_token_rows_in_forward(model)
    return model


@contextlib.contextmanager
def _token_rows_initialised_gathered(model):
    """peft's own ZeRO-3 initialisation of the token rows
    (``TrainableTokensLayer._collect_token_weights``) gathers the embedding on rank 0 and
    broadcasts into a receive buffer it always puts on CUDA, so it fails on CPU workers. Instead
    gather the embeddings whole on every rank and let peft copy the rows as it does without
    ZeRO (same values on every rank, on any device)."""
    from peft.tuners.trainable_tokens import layer

    check = layer.check_deepspeed_zero3_enabled
    layer.check_deepspeed_zero3_enabled = lambda: False  # only this module's view; restored below
    try:
        with vocab.gathered(vocab.embedding_weights(model), modifier_rank=None):
            yield
    finally:
        layer.check_deepspeed_zero3_enabled = check


def _gather_token_rows_in_forward(model) -> None:
    """ZeRO-3 gathers a module's own parameters around its forward and backward. peft's token
    layer instead reads the base embedding's weight and its row delta (held in a ParameterDict;
    a tied lm_head's layer reads the input layer's) without calling their modules, so it would
    see empty partitions: register them with DeepSpeed as the layer's external parameters."""
    import deepspeed
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    for module in model.modules():
        if isinstance(module, TrainableTokensLayer):
            deltas = list(module.trainable_tokens_delta.values())
            for param in [module.get_base_layer().weight, *deltas]:
                deepspeed.zero.register_external_parameter(module, param)


def wrap_saved(model, hf_dir: str):
    """`model` wrapped as the checkpoint's adapter model was (export), or as it is when the
    checkpoint has no adapter."""
    import os

    if not os.path.exists(os.path.join(hf_dir, ADAPTER_CONFIG)):
        return model
    import peft  # only LoRA runs need the `lora` extra

    return peft.get_peft_model(model, peft.PeftConfig.from_pretrained(hf_dir))


def peft_configs(model) -> list:
    """The adapter configs of a peft-wrapped model (none for a plain one), to save beside it."""
    return list(getattr(model, "peft_config", {}).values())


def save_pretrained(model, folder: str, model_cfg: dict) -> None:
    """Save a model for export: safetensors weights, or for a peft model its adapter alone,
    with the (extended) embeddings when the run added tokens, since the base lacks them."""
    if not peft_configs(model):
        model.save_pretrained(folder, safe_serialization=True)
        return
    for cfg in peft_configs(model):
        cfg.base_model_name_or_path = model_cfg.get("path")
    extended = bool(model_cfg.get("add_tokens") or model_cfg.get("vocab_file"))
    model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=extended)
