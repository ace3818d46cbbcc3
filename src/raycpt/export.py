"""`raycpt export`: a checkpoint consolidated into a Hugging Face model folder (safetensors, config,
tokenizer) that plain ``transformers`` loads, verified against the engine's own logits."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile

import torch

from raycpt import checkpoint as ckpt
from raycpt import storage
from raycpt.train import adapters

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The export could not be made or does not reproduce the trained engine."""


# Largest |logit difference| accepted between the exported model and the engine, by precision.
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}


def _verify(model, folder: str) -> float | None:
    path = os.path.join(folder, ckpt.PROBE)
    if not os.path.exists(path):
        return None
    probe = torch.load(path, weights_only=True)
    precision = probe.get("precision", "fp32")
    check = model
    if precision != "fp32":  # compare like with like: the engine ran with cast parameters
        check = copy.deepcopy(model).eval()  # any model class, peft-wrapped ones included
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        for p in check.parameters():
            p.data = p.data.to(dtype)
    with torch.no_grad():
        logits = check(input_ids=probe["input_ids"]).logits.float()
    diff = (logits - probe["logits"]).abs().max().item()
    if diff > TOLERANCE[precision]:
        raise ExportError(
            f"exported model differs from the trained engine: max |logit diff| {diff:.2e} > "
            f"{TOLERANCE[precision]:.0e}; the checkpoint may be incomplete"
        )
    return diff


def consolidate(checkpoint: str, best: bool = False, merge: bool = True):
    """The model of `checkpoint` (a run folder, its latest; or a checkpoint folder; local or S3)
    as one fp32 Hugging Face model in memory. Returns (model, local folder, metadata).

    A LoRA run's model comes back with its adapters merged into the weights, or with
    ``merge=False`` as the peft model it trained as."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    location = ckpt.resolve(checkpoint, best=best)
    folder = ckpt.fetch(location)
    meta = {**json.load(open(os.path.join(folder, ckpt.META))), "location": location}
    config = AutoConfig.from_pretrained(os.path.join(folder, "hf"))
    if meta.get("zero_stage", 0) == 0:  # no ZeRO partitions: the module is saved whole
        states = torch.load(
            os.path.join(folder, ckpt.DS_TAG, "mp_rank_00_model_states.pt"),
            map_location="cpu",
            weights_only=False,
        )
        state = {k: v.float() for k, v in states["module"].items()}
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(folder, tag=ckpt.DS_TAG)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = adapters.wrap_saved(model, os.path.join(folder, "hf"))
    # strict: a missing or unexpected tensor means the checkpoint does not match its config
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    model.tie_weights()
    if merge and adapters.peft_configs(model):
        model = model.merge_and_unload()
    model.eval()
    return model, folder, meta


def export(checkpoint: str, out: str, best: bool = False, merge: bool = False) -> dict:
    """Consolidate `checkpoint` (a run folder or checkpoint folder, local or S3) into `out`;
    from a run folder, its latest checkpoint, or with ``best`` its best-scored one. A LoRA
    run exports its adapter alone (peft format), or with ``merge`` the merged full model."""
    from transformers import AutoTokenizer

    model, folder, meta = consolidate(checkpoint, best, merge=merge)
    location = meta["location"]
    hf_dir = os.path.join(folder, "hf")
    diff = _verify(model, folder)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)

    local_out = out if not storage.is_remote(out) else tempfile.mkdtemp(prefix="raycpt-export-")
    staging = f"{local_out.rstrip('/')}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    adapters.save_pretrained(model, staging, meta["config"]["model"])
    tokenizer.save_pretrained(staging)
    info = {
        "checkpoint": location,
        "step": meta["step"],
        "config_hash": meta.get("config_hash"),
        "probe_max_abs_diff": diff,
        "format": "adapter" if adapters.peft_configs(model) else "model",
    }
    with open(os.path.join(staging, "raycpt_export.json"), "w") as f:
        json.dump(info, f, indent=2)
    # The folder appears complete or not at all.
    shutil.rmtree(local_out, ignore_errors=True)
    os.replace(staging, local_out)
    if storage.is_remote(out):
        for name in sorted(os.listdir(local_out)):
            with open(os.path.join(local_out, name), "rb") as f:
                storage.write_bytes(storage.join(out, name), f.read())
    log.info("exported step %s of %s to %s (probe diff %s)", meta["step"], location, out, diff)
    return info
