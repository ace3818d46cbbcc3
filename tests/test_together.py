"""Every feature in one run: added domain tokens + LoRA (ZeRO-2) + a two-source mix with replay +
in-process augmentation + periodic evaluation, stopped and resumed, then exported merged. Each
feature is tested alone elsewhere; this checks they compose."""

import pytest

from raycpt import checkpoint as ckpt
from raycpt.config import parse_config
from raycpt.evaluate import evaluate_folder
from raycpt.export import export
from raycpt.train import launch

pytestmark = pytest.mark.slow

TERMS = ["aspirin", "allergies", "exercise", "pressure"]


def test_vocab_lora_mix_augment_eval_resume_export(
    ray_cluster, run_config, domain_dataset, base_model_dir, tmp_path
):
    def config(max_steps: int) -> dict:
        cfg = run_config(
            name="together",
            model__add_tokens=TERMS,
            train__max_steps=max_steps,
            train__log_every=2,
            checkpoint__every_steps=4,
        )
        cfg["model"]["lora"] = {"rank": 8, "alpha": 16, "trainable_embeddings": "new_tokens"}
        cfg["train"]["schedule"] = {"warmup_steps": 1, "horizon_steps": 8}
        cfg["data"]["sources"] = [
            {"name": "domain", "path": str(domain_dataset), "weight": 0.75},
            {"name": "replay", "path": str(domain_dataset), "weight": 0.25},
        ]
        cfg["augment"] = {
            "enabled": True,
            "pool": {"min_actors": 0, "max_actors": 0},
            "transforms": [{"type": "noise", "rate": 0.02, "p": 1.0}],
        }
        cfg["eval"] = {
            "every_steps": 4,
            "sets": [
                {"name": "dom", "path": str(domain_dataset), "role": "domain", "max_tokens": 10**6}
            ],
        }
        return cfg

    launch.run(parse_config(config(4)))
    cfg = parse_config(config(8))
    launch.run(cfg)
    meta = ckpt.read_meta(ckpt.fetch(ckpt.resolve(launch.run_dir(cfg))))
    assert meta["segments"] == [[0, 4], [4, 8]]
    evals = [h for h in meta["history"] if "eval/domain/ppl" in h]
    assert [e["step"] for e in evals] == [0, 4, 8]
    assert evals[-1]["eval/domain/ppl_vs_base"] < 1.0
    # the mix: 8 steps x 8 sequences x 64 tokens, 3:1
    tokens = meta["tokens_per_source"]
    assert sum(tokens.values()) == 8 * 8 * 64
    assert tokens["domain"] == 3 * tokens["replay"]
    last = meta["history"][-1]
    assert last["augment/noise/docs"] > 0
    # evaluation tokenized the whole held-out split with the extended tokenizer: fewer tokens for
    # the same documents than the base tokenizer needs
    base = evaluate_folder(str(base_model_dir), str(domain_dataset), "heldout", 64, 10**6)
    assert 0 < evals[0]["eval/set/dom/tokens"] < 0.9 * base.tokens
    merged = export(launch.run_dir(cfg), str(tmp_path / "merged"), merge=True)
    assert merged["step"] == 8
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    for term in TERMS:
        assert len(tok(" " + term, add_special_tokens=False)["input_ids"]) == 1, term
