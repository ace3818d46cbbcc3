"""LoRA continued pretraining through peft: the base model frozen, low-rank adapters (and,
optionally, embedding rows) trained, in the same DeepSpeed engine and Ray Train loop.

The adapter's peft config is saved with every checkpoint (``hf/adapter_config.json``), so
export rebuilds the same wrapped model without the run config.
"""

from __future__ import annotations

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
    """`model` wrapped by peft: only adapters (and the chosen embedding rows) require grad."""
    import peft

    return peft.get_peft_model(model, peft_config(cfg, model, new_token_ids))


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
