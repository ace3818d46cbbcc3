"""Checkpoint cost: seconds to save and to restore ZeRO-2 and ZeRO-3 checkpoints of a ~100M-param
Llama (2 CPU workers, fp32) to local disk and to S3, against moving the same bytes with a plain
parallel copy / upload / download.

    python bench/checkpoint.py [--repeats 2] [--workdir /tmp/raycpt-bench-ckpt]

S3 is a moto_server process on loopback, started here. Each case trains 2 steps with a checkpoint
after each, then resumes for a third. The run's own metrics give: `ckpt/write_s` (DeepSpeed writes
each worker's shards into a local folder), `ckpt/upload_s` (Ray Train copies them to the storage
path and registers the checkpoint), `ckpt/bytes` (all workers), and `ckpt/restore_s` (download +
DeepSpeed load, on resume). The baseline moves the final checkpoint's files with 8 threads: a copy
to another local folder, a boto3 managed upload to S3 (multipart, 10 threads per file), a download.

On local disk a second copy is timed too (`plain_save_2_s`), kept beside the first: on this kind
of sandboxed machine writing into page-cache memory that a just-deleted file gave back runs at
~4.5 GB/s, into memory the page cache has not held before at ~0.4 GB/s, and the first copy lands
mostly on the pages the run's deleted checkpoints freed, while a run's own saves do not.
`--cases z2-local` (ZeRO stage - storage) runs only the cases named.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream import start_s3, use_s3  # noqa: E402
from train_step import setup  # noqa: E402

from raycpt import checkpoint as ckpt  # noqa: E402
from raycpt import storage  # noqa: E402
from raycpt.config import parse_config  # noqa: E402
from raycpt.train import launch  # noqa: E402


def model_fields(vocab: int) -> dict:
    """~100M parameters: hidden 768, 12 layers (GQA 12/4 heads), FFN 2048."""
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }


def case(work: Path, name: str, storage_path: str, zero: int, data, tok, vocab) -> dict:
    cfg = {
        "name": name,
        "storage_path": storage_path,
        "model": {"init": model_fields(vocab), "tokenizer": str(tok)},
        "data": {"sources": [{"name": "d", "path": str(data)}], "seq_len": 64},
        "train": {
            "max_steps": 2,
            "micro_batch_size": 1,
            "global_batch_size": 2,
            "lr": 1e-4,
            "log_every": 1,
        },
        "deepspeed": {"zero_stage": zero},
        "checkpoint": {"every_steps": 1, "num_to_keep": 1},
        "scaling": {"num_workers": 2},
    }
    launch.run(parse_config(cfg))
    cfg["train"]["max_steps"] = 3  # resume: restore the step-2 checkpoint, train one more
    launch.run(parse_config(cfg))
    run = storage.join(storage_path, name)
    history = json.loads(storage.read_bytes(storage.join(ckpt.resolve(run), ckpt.META)))["history"]
    saved = next(h for h in history if "ckpt/bytes" in h)
    restored = next(h for h in history if "ckpt/restore_s" in h)
    return {
        "bytes": saved["ckpt/bytes"],
        "write_s": saved["ckpt/write_s"],
        "upload_s": saved["ckpt/upload_s"],
        "save_s": saved["ckpt/write_s"] + saved["ckpt/upload_s"],
        "restore_s": restored["ckpt/restore_s"],
        "run": run,
    }


def _files(folder: str) -> list[str]:
    return [os.path.join(r, n) for r, _, names in os.walk(folder) for n in names]


def _copy_tree(src: str, dest: str) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        for f in _files(src):
            out = os.path.join(dest, os.path.relpath(f, src))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            pool.submit(shutil.copyfile, f, out)
    return time.perf_counter() - t0


def plain_local(src: str) -> tuple[float, float, float]:
    """Copy a checkpoint's files to a new folder (save), from there to another (restore), then
    once more to a third (a second save, onto page-cache memory the first did not recycle)."""
    saved, restored, again = tempfile.mkdtemp(), tempfile.mkdtemp(), tempfile.mkdtemp()
    times = _copy_tree(src, saved), _copy_tree(saved, restored), _copy_tree(src, again)
    for folder in (saved, restored, again):
        shutil.rmtree(folder)
    return times


def plain_s3(src: str, bucket: str) -> tuple[float, float]:
    """Managed boto3 upload of the files (8 files at once, multipart) and download back."""
    from boto3.s3.transfer import TransferConfig

    client = storage._S3.client()
    config = TransferConfig(max_concurrency=10)
    files = _files(src)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        for f in files:
            key = f"plain/{os.path.relpath(f, src)}"
            pool.submit(client.upload_file, f, bucket, key, Config=config)
    up = time.perf_counter() - t0
    dest = tempfile.mkdtemp()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        for f in files:
            key = f"plain/{os.path.relpath(f, src)}"
            out = os.path.join(dest, os.path.relpath(f, src))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            pool.submit(client.download_file, bucket, key, out, Config=config)
    return up, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/raycpt-bench-ckpt")
    p.add_argument("--cases", nargs="*", help="only these, e.g. z2-local z3-s3 (default: all)")
    args = p.parse_args()
    work = Path(args.workdir)
    data, tok, vocab = setup(work)
    s3, endpoint = start_s3()
    use_s3(endpoint)
    launch.init_ray()
    try:
        for zero in (2, 3):
            for kind in ("local", "s3"):
                if args.cases and f"z{zero}-{kind}" not in args.cases:
                    continue
                rows = []
                for i in range(args.repeats):
                    root = str(work / "runs") if kind == "local" else "s3://bench/runs"
                    r = case(work, f"z{zero}-{kind}-{i}", root, zero, data, tok, vocab)
                    local = ckpt.fetch(ckpt.resolve(r["run"]))
                    plain = plain_local(local) if kind == "local" else plain_s3(local, "bench")
                    rows.append({**r, "plain_save_s": plain[0], "plain_restore_s": plain[1]})
                    if kind == "local":
                        rows[-1]["plain_save_2_s"] = plain[2]
                med = {k: statistics.median(x[k] for x in rows) for k in rows[0] if k != "run"}
                med.update(
                    zero=zero,
                    storage=kind,
                    save_gb_s=med["bytes"] / med["save_s"] / 1e9,
                    save_vs_plain=med["save_s"] / med["plain_save_s"],
                    restore_vs_plain=med["restore_s"] / med["plain_restore_s"],
                )
                if "plain_save_2_s" in med:
                    med["save_vs_plain_2"] = med["save_s"] / med["plain_save_2_s"]
                print(json.dumps(med), flush=True)
    finally:
        s3.terminate()
        shutil.rmtree(work / "runs", ignore_errors=True)


if __name__ == "__main__":
    main()
