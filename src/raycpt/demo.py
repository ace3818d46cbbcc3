"""`raycpt demo`: a real, small continued-pretraining run from nothing but the Python installation.

1. corpora: general prose (the language reference in ``pydoc_data`` and standard-library
   docstrings) and a domain (standard-library source code), as jsonl files;
2. ``prepare`` both, with a held-out split;
3. a byte-level BPE tokenizer trained on the general corpus only (like a real base model's);
4. a small base Llama pretrained on the general corpus (a raycpt run from scratch), exported;
5. continued pretraining on domain + 10 % general replay, 2 Ray workers, ZeRO-2, exported;
6. domain and general perplexity of the base and of the continued model.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import sysconfig
import time
from pathlib import Path

from raycpt.config import CPTConfig, PrepareConfig, parse_config

log = logging.getLogger(__name__)

# Standard-library packages used as the "domain": code a Python practitioner reads every day.
DOMAIN_PACKAGES = (
    "json",
    "email",
    "http",
    "logging",
    "asyncio",
    "concurrent",
    "importlib",
    "urllib",
    "xml",
    "unittest",
    "collections",
    "sqlite3",
    "multiprocessing",
)
SEQ_LEN = 128


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def general_texts() -> list[str]:
    """The language reference topics and every stdlib module's docstrings, one doc per module."""
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        docs = [
            ast.get_docstring(n)
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef)
        ]
        text = "\n\n".join(d for d in docs if d)
        if text:
            texts.append(text)
    return texts


def domain_texts() -> list[str]:
    """Source files of a few standard-library packages, one document per file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for pkg in DOMAIN_PACKAGES:
        for path in sorted((stdlib / pkg).rglob("*.py")):
            if "test" in path.parts[len(stdlib.parts) : -1]:
                continue
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return texts


def train_tokenizer(texts: list[str], out: Path, vocab_size: int = 2048) -> None:
    """A byte-level BPE tokenizer trained locally, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(out)


def tiny_llama(vocab_size: int, hidden: int = 128, layers: int = 4) -> dict:
    """Config fields of a small Llama (model.init)."""
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": hidden * 3,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    }


def _run_config(
    work: Path,
    name: str,
    model: dict,
    sources: list[dict],
    steps: int,
    workers: int,
    zero: int,
    lr: float,
    schedule: dict,
    eval_cfg: dict | None = None,
) -> CPTConfig:
    return parse_config(
        {
            "name": name,
            "storage_path": str(work / "runs"),
            "seed": 0,
            "model": model,
            "data": {"sources": sources, "seq_len": SEQ_LEN},
            "train": {
                "max_steps": steps,
                "micro_batch_size": 8,
                "global_batch_size": 16,
                "lr": lr,
                "schedule": schedule,
                "log_every": 10,
            },
            "deepspeed": {"zero_stage": zero},
            "checkpoint": {"every_steps": steps, "num_to_keep": 1},
            "scaling": {"num_workers": workers},
            "eval": eval_cfg or {},
        },
        CPTConfig,
        source=f"demo:{name}",
    )


def run_demo(work: Path, base_steps: int = 300, cpt_steps: int = 150) -> dict:
    """Run every stage of the demo in `work`; return the perplexity table."""
    from raycpt import export, prepare
    from raycpt.evaluate import evaluate_folder
    from raycpt.train import launch

    t0 = time.time()
    work = work.resolve()
    _write_jsonl(work / "raw/general/general.jsonl", general_texts())
    _write_jsonl(work / "raw/domain/domain.jsonl", domain_texts())
    for corpus in ("general", "domain"):
        prepare.prepare(
            PrepareConfig(
                inputs=[str(work / "raw" / corpus)],
                output=str(work / "data" / corpus),
                heldout_fraction=0.05,
            )
        )
    train_tokenizer(general_texts(), work / "tokenizer")
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(work / "tokenizer"))
    general = {"name": "general", "path": str(work / "data/general")}
    domain = {"name": "domain", "path": str(work / "data/domain")}

    log.info("pretraining the base model on the general corpus")
    base_cfg = _run_config(
        work,
        "base",
        {"init": tiny_llama(vocab), "tokenizer": str(work / "tokenizer")},
        [general],
        base_steps,
        1,
        0,
        3e-3,
        {"warmup_steps": 20, "min_lr_ratio": 0.1},
    )
    launch.run(base_cfg)
    export.export(launch.run_dir(base_cfg), str(work / "base-model"))

    log.info("continued pretraining on the domain corpus with general replay")
    cpt_cfg = _run_config(
        work,
        "cpt",
        {"path": str(work / "base-model")},
        [{**domain, "weight": 0.9}, {**general, "weight": 0.1}],
        cpt_steps,
        2,
        2,
        1e-3,
        {"name": "rewarm_cosine", "warmup_steps": 15, "min_lr_ratio": 0.1},
        {
            "every_steps": max(cpt_steps // 3, 1),
            "sets": [
                {**domain, "role": "domain", "max_tokens": 16_384},
                {**general, "role": "general", "max_tokens": 16_384},
            ],
        },
    )
    launch.run(cpt_cfg)
    export.export(launch.run_dir(cpt_cfg), str(work / "cpt-model"))
    from raycpt.report import write_report

    write_report(launch.run_dir(cpt_cfg), str(work / "report"))

    table = {}
    for model in ("base-model", "cpt-model"):
        for corpus in ("domain", "general"):
            r = evaluate_folder(
                str(work / model),
                str(work / "data" / corpus),
                "heldout",
                SEQ_LEN,
                max_tokens=40_000,
            )
            table[(model, corpus)] = r
    summary = {
        f"{m}/{c}": {"perplexity": r.perplexity, "bits_per_byte": r.bits_per_byte}
        for (m, c), r in table.items()
    }
    summary["wall_s"] = time.time() - t0
    (work / "demo-results.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict) -> str:
    rows = ["", f"{'model':<12}{'domain ppl':>12}{'general ppl':>13}{'domain bpb':>12}"]
    for m in ("base-model", "cpt-model"):
        d, g = summary[f"{m}/domain"], summary[f"{m}/general"]
        rows.append(
            f"{m:<12}{d['perplexity']:>12.2f}{g['perplexity']:>13.2f}{d['bits_per_byte']:>12.3f}"
        )
    rows.append(f"wall time {summary['wall_s']:.0f} s")
    return "\n".join(rows)


def default_workdir() -> Path:
    return Path(os.environ.get("RAYCPT_DEMO_DIR", "raycpt-demo"))
