"""Per-step time of `raycpt train` with 2 CPU workers under ZeRO-1, 2 and 3.

    python bench/train_step.py [--steps 60] [--stages 2,3] [--accum 1] [--workdir DIR] [--augment]

Builds the demo's corpora, tokenizer and a small Llama (hidden 128, 4 layers, vocab 2048) from
scratch, then trains it for --steps steps per stage (seq 128, micro-batch 8, global batch 16) and
prints the median step time over the reporting windows after the first (which holds start-up).
`--accum N` takes N micro-batches per step (global batch 16 x N): ZeRO-2 reduces gradients after
every micro-batch, ZeRO-1 only at the step's end.
"""

import argparse
import json
import statistics
from pathlib import Path

from raycpt import checkpoint as ckpt
from raycpt.config import PrepareConfig, parse_config
from raycpt.demo import SEQ_LEN, _write_jsonl, domain_texts, tiny_llama, train_tokenizer
from raycpt.prepare import prepare
from raycpt.train import launch


def setup(work: Path) -> tuple[Path, Path, int]:
    from transformers import AutoTokenizer

    if not (work / "data" / "manifest.json").exists():
        _write_jsonl(work / "raw" / "domain.jsonl", domain_texts())
        prepare(PrepareConfig(inputs=[str(work / "raw")], output=str(work / "data")))
        train_tokenizer(domain_texts()[:300], work / "tokenizer")
    return work / "data", work / "tokenizer", len(AutoTokenizer.from_pretrained(work / "tokenizer"))


def augment_config(work: Path) -> dict:
    """The augmentation benchmark's transforms, every document touched, on a 1-2 actor pool."""
    lexicon = work / "lexicon.txt"
    lexicon.write_text("function | func\nargument | arg\ndictionary | dict\nexception | error\n")
    return {
        "enabled": True,
        "pool": {"min_actors": 1, "max_actors": 2, "cpus_per_actor": 0.5},
        "transforms": [
            {"type": "lexicon", "path": str(lexicon), "p": 1.0},
            {"type": "noise", "p": 1.0},
            {"type": "format", "p": 1.0},
            {"type": "sentence", "p": 1.0},
        ],
    }


def run_config(
    work: Path, name: str, stage: int, steps: int, data, tok, vocab: int, accum: int = 1
) -> dict:
    """The benchmark run: the demo's small Llama, seq 128, micro-batch 8, global batch 16 x
    accum, 2 workers, one checkpoint at the end (after the timed windows)."""
    return {
        "name": name,
        "storage_path": str(work / "runs"),
        "model": {"init": tiny_llama(vocab), "tokenizer": str(tok)},
        "data": {"sources": [{"name": "d", "path": str(data)}], "seq_len": SEQ_LEN},
        "train": {
            "max_steps": steps,
            "micro_batch_size": 8,
            "global_batch_size": 16 * accum,
            "lr": 1e-3,
            "log_every": 10,
        },
        "deepspeed": {"zero_stage": stage},
        "checkpoint": {"every_steps": steps},
        "scaling": {"num_workers": 2},
    }


def measure(
    work: Path,
    stage: int,
    steps: int,
    data: Path,
    tok: Path,
    vocab: int,
    augment: bool = False,
    accum: int = 1,
) -> dict:
    name = f"zero{stage}{'-aug' if augment else ''}-x{accum}"
    cfg = run_config(work, name, stage, steps, data, tok, vocab, accum)
    cfg = parse_config({**cfg, "augment": augment_config(work) if augment else {}})
    launch.run(cfg)
    history = ckpt.read_meta(ckpt.fetch(ckpt.resolve(launch.run_dir(cfg))))["history"][1:]
    tokens_per_step = 16 * accum * SEQ_LEN
    step_s = [tokens_per_step / h["tokens_per_s"] for h in history]
    return {
        "zero_stage": stage,
        "augment": augment,
        "accum": accum,
        "median_step_ms": 1000 * statistics.median(step_s),
        "min_step_ms": 1000 * min(step_s),
        "max_step_ms": 1000 * max(step_s),
        "tokens_per_s": tokens_per_step / statistics.median(step_s),
        "data_wait_frac": statistics.median(h["data_wait_frac"] for h in history),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--workdir", default="/tmp/raycpt-bench")
    p.add_argument("--augment", action="store_true", help="ZeRO-2 with and without augmentation")
    p.add_argument("--stages", default="2,3", help="ZeRO stages to run, in order")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    args = p.parse_args()
    work = Path(args.workdir)
    import shutil

    shutil.rmtree(work / "runs", ignore_errors=True)
    data, tok, vocab = setup(work)
    launch.init_ray()
    if args.augment:
        for augment in (False, True):
            row = measure(work, 2, args.steps, data, tok, vocab, augment, accum=args.accum)
            print(json.dumps(row))
        return
    for stage in (int(x) for x in args.stages.split(",")):
        print(json.dumps(measure(work, stage, args.steps, data, tok, vocab, accum=args.accum)))


if __name__ == "__main__":
    main()
