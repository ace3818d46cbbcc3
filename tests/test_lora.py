"""LoRA continued pretraining (peft) in the Ray Train + DeepSpeed loop, with added tokens: only
the adapters and the chosen embedding rows train, under ZeRO-2 and ZeRO-3, in fp32 and bf16;
the run resumes (on another worker count too); the adapter export and the merged export both
reproduce the engine's logits; a two-stage run carries the adapters from stage to stage."""

import pytest
import torch

from raycpt import checkpoint as ckpt
from raycpt.config import parse_config
from raycpt.export import TOLERANCE, consolidate, export
from raycpt.train import launch

pytestmark = pytest.mark.slow

TERMS = ["aspirin", "allergies", "exercise", "pressure"]
NEW_IDS = list(range(300, 304))  # the tiny tokenizer has 300 tokens
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def lora_config(run_config, stage: int, embeddings: str, precision: str, **overrides) -> dict:
    cfg = run_config(
        name=f"lora{stage}-{embeddings}-{precision}",
        deepspeed__zero_stage=stage,
        deepspeed__precision=precision,
        model__add_tokens=TERMS,
        train__lr=1e-2,
        train__log_every=2,
        checkpoint__every_steps=4,
        **overrides,
    )
    cfg["model"]["lora"] = {"rank": 8, "alpha": 16, "trainable_embeddings": embeddings}
    cfg["train"]["schedule"] = {"warmup_steps": 1, "horizon_steps": 8}
    return cfg


def base_state(base_model_dir, precision: str) -> dict:
    """The base model's weights as the engine held them (rounded to its precision)."""
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(base_model_dir).state_dict()
    return {k: v.to(DTYPE[precision]).float() for k, v in state.items()}


# (ZeRO stage, trainable embeddings, precision, workers after the resume)
CASES = [
    pytest.param(2, "new_tokens", "bf16", 2, id="zero2-new_tokens-bf16"),
    pytest.param(3, "new_tokens", "bf16", 1, id="zero3-new_tokens-bf16-resharded"),
    pytest.param(3, "all", "fp32", 2, id="zero3-all-fp32"),
]


@pytest.mark.parametrize(("stage", "embeddings", "precision", "workers"), CASES)
def test_lora_trains_only_chosen_params_resumes_and_exports(
    ray_cluster, run_config, base_model_dir, stage, embeddings, precision, workers, tmp_path
):
    """4 steps on 2 workers, stop, resume to 8 (on `workers`); then the checks below."""
    launch.run(
        parse_config(lora_config(run_config, stage, embeddings, precision, train__max_steps=4))
    )
    cfg = parse_config(
        lora_config(
            run_config,
            stage,
            embeddings,
            precision,
            train__max_steps=8,
            scaling__num_workers=workers,
        )
    )
    launch.run(cfg)
    run = launch.run_dir(cfg)
    meta = ckpt.read_meta(ckpt.fetch(ckpt.resolve(run)))
    assert meta["segments"] == [[0, 4], [4, 8]] and meta["world_size"] == workers
    losses = [h["loss"] for h in meta["history"]]
    # the base is random: adapters on attention/MLP alone barely move its loss (the new rows
    # and adapters are checked below); training the whole embeddings moves it a lot
    assert losses[-1] < losses[0] - (0.5 if embeddings == "all" else 0.0), losses
    check_only_chosen_params_trained(run, embeddings, base_state(base_model_dir, precision))
    check_exports_match_the_engine(cfg, precision, tmp_path)


def check_only_chosen_params_trained(run: str, embeddings: str, base: dict) -> None:
    model, _, _ = consolidate(run, merge=False)
    state = {k.removeprefix("base_model.model."): v for k, v in model.state_dict().items()}
    frozen = {k.replace(".base_layer", ""): v for k, v in state.items() if "base_layer" in k}
    frozen = {k: v for k, v in frozen.items() if "token_adapter" not in k}
    assert frozen and all(torch.equal(v, base[k]) for k, v in frozen.items())  # untouched
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # adapters start at 0: trained
    for name in ("model.embed_tokens", "lm_head"):
        if embeddings == "new_tokens":
            old = state[f"{name}.token_adapter.base_layer.weight"]
            assert torch.equal(old[:300], base[f"{name}.weight"])  # base rows bit-identical
            delta = state[f"{name}.token_adapter.trainable_tokens_delta.default"]
            assert delta.shape == (len(NEW_IDS), old.shape[1])
            assert not torch.allclose(delta, old[NEW_IDS])  # the new rows trained
        else:
            original = state[f"{name}.original_module.weight"]
            trained = state[f"{name}.modules_to_save.default.weight"]
            assert torch.equal(original[:300], base[f"{name}.weight"])
            assert not torch.allclose(trained[:300], original[:300])  # all rows trained


def probe_logits(model, probe: dict, precision: str) -> torch.Tensor:
    """`model`'s logits on the engine's probe, its parameters cast as the engine's were."""
    import copy

    model = copy.deepcopy(model)
    for p in model.parameters():
        p.data = p.data.to(DTYPE[precision])
    with torch.no_grad():
        return model(input_ids=probe["input_ids"]).logits.float()


def check_exports_match_the_engine(cfg, precision: str, tmp_path) -> None:
    """The adapter export (on a resized base, loaded by peft) and the merged export (plain
    transformers) give the same logits, and the engine's within its precision's tolerance."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = launch.run_dir(cfg)
    probe = torch.load(f"{ckpt.fetch(ckpt.resolve(run))}/{ckpt.PROBE}", weights_only=True)
    tol = TOLERANCE[precision]

    info = export(run, str(tmp_path / "adapter"))
    assert info["format"] == "adapter" and info["probe_max_abs_diff"] <= tol
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path)
    base.resize_token_embeddings(len(tok), pad_to_multiple_of=cfg.model.vocab_pad_multiple)
    adapter = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()

    info = export(run, str(tmp_path / "merged"), merge=True)
    assert info["format"] == "model" and info["probe_max_abs_diff"] <= tol
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k or "token_adapter" in k for k in merged.state_dict())
    if cfg.model.lora.trainable_embeddings == "new_tokens":  # the trained rows, merged in
        from safetensors.torch import load_file

        saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
        for name in ("model.embed_tokens", "lm_head"):
            delta = saved[f"base_model.model.{name}.token_adapter.trainable_tokens_delta"]
            assert torch.equal(merged.get_parameter(f"{name}.weight")[NEW_IDS], delta)
    with torch.no_grad():
        a = adapter(input_ids=probe["input_ids"]).logits
        m = merged(input_ids=probe["input_ids"]).logits
    # fp32: merging is exact. bf16: the merged weights hold the bf16-rounded base the engine
    # trained on, while the adapter sits on the original fp32 base
    torch.testing.assert_close(m, a, atol=tol, rtol=0)
    torch.testing.assert_close(
        probe_logits(adapter, probe, precision), probe["logits"], atol=tol, rtol=0
    )
    torch.testing.assert_close(
        probe_logits(merged, probe, precision), probe["logits"], atol=tol, rtol=0
    )


def test_two_stage_lora_run_carries_the_adapters(ray_cluster, run_config, domain_dataset, tmp_path):
    """Stage 2 starts from stage 1's adapters and token rows: its step-0 evaluation equals stage
    1's final one (and not the base model's); the last stage exports merged."""
    from transformers import AutoModelForCausalLM

    cfg = lora_config(run_config, 3, "new_tokens", "fp32", train__max_steps=4)
    cfg["eval"] = {
        "every_steps": 4,
        "sets": [{"name": "dom", "path": str(domain_dataset), "role": "domain"}],
    }
    cfg["stages"] = [{"name": "one", "max_steps": 4}, {"name": "two", "max_steps": 4, "lr": 3e-3}]
    staged = parse_config(cfg)
    launch.run(staged)
    one, two = (
        ckpt.read_meta(ckpt.fetch(ckpt.resolve(launch.run_dir(c))))
        for c in launch.stage_configs(staged)
    )
    assert two["started_from"] == ckpt.resolve(launch.run_dir(launch.stage_configs(staged)[0]))
    ppl = "eval/set/dom/ppl"
    evals_one = {h["step"]: h[ppl] for h in one["history"] if ppl in h}
    evals_two = {h["step"]: h[ppl] for h in two["history"] if ppl in h}
    assert sorted(evals_one) == sorted(evals_two) == [0, 4]
    assert evals_one[4] < evals_one[0]  # stage 1 trained the adapters
    assert evals_two[0] == pytest.approx(evals_one[4], rel=1e-5)  # and stage 2 starts there
    info = export(launch.run_dir(launch.stage_configs(staged)[1]), str(tmp_path / "m"), merge=True)
    assert info["step"] == 4 and info["probe_max_abs_diff"] <= 1e-4
    AutoModelForCausalLM.from_pretrained(tmp_path / "m")
