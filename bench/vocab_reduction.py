"""Tokens per document saved by `raycpt vocab`'s proposal, on the test suite's domain corpus and
on the demo's domain corpus.

    python bench/vocab_reduction.py [--workdir /tmp/raycpt-vocab] [--demo-dir raycpt-demo]
                                    [--top 8 100 500]

The test corpus and tokenizer are rebuilt exactly as tests/conftest.py builds them (400
synthetic clinical notes; a byte-level BPE of 300 tokens). The demo corpus is the domain split
and tokenizer of a finished `raycpt demo` working folder (skipped when absent). For each --top
K the command `raycpt vocab --config RUN.yaml --top K` is run, which tokenizes the same
documents with the base and the extended tokenizer.
"""

import argparse
import sys
from pathlib import Path

import yaml

from raycpt.cli import main

TESTS = Path(__file__).resolve().parents[1] / "tests"


def test_corpus(work: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(TESTS))
    from support import synthetic_docs, write_jsonl

    from raycpt.config import PrepareConfig
    from raycpt.demo import train_tokenizer
    from raycpt.prepare import prepare

    if not (work / "prepared" / "manifest.json").exists():
        write_jsonl(work / "raw" / "docs.jsonl", synthetic_docs(400, seed=2))
        prepare(
            PrepareConfig(
                inputs=[str(work / "raw")],
                output=str(work / "prepared"),
                min_shards=16,
                heldout_fraction=0.1,
            )
        )
        train_tokenizer(synthetic_docs(300, seed=1), work / "tokenizer", vocab_size=300)
    return work / "prepared", work / "tokenizer"


def run_yaml(work: Path, name: str, data: Path, tokenizer: Path) -> Path:
    """A minimal run config: `raycpt vocab` reads its data.sources and model.tokenizer."""
    cfg = {
        "name": name,
        "storage_path": str(work / "runs"),
        "model": {"path": str(tokenizer), "tokenizer": str(tokenizer)},
        "data": {"sources": [{"name": "domain", "path": str(data)}]},
        "train": {"max_steps": 1, "micro_batch_size": 1, "global_batch_size": 1, "lr": 1e-4},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main_() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/raycpt-vocab")
    p.add_argument("--demo-dir", default="raycpt-demo")
    p.add_argument("--top", type=int, nargs="+", default=[8, 100, 500])
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    configs = {"test corpus": run_yaml(work, "tests", *test_corpus(work))}
    demo = Path(args.demo_dir)
    if (demo / "data" / "domain" / "manifest.json").exists():
        configs["demo domain corpus"] = run_yaml(
            work, "demo", demo / "data" / "domain", demo / "tokenizer"
        )
    for label, path in configs.items():
        for k in args.top:
            print(f"== {label}, --top {k}", flush=True)
            main(["vocab", "--config", str(path), "--top", str(k)])


if __name__ == "__main__":
    main_()
