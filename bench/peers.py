"""The data path against peers: tokens/s delivered to a training loop by raycpt's streaming loader
and by mosaicml-streaming (its maintained fork `streaming-community`) and `litdata`, reading the
same documents from local disk or S3, one process each, augmentation off.

    python bench/peers.py --peer-python /tmp/peers-venv/bin/python [--repeats 3] [--s3]

The peers live in their own virtual environment (FIELD-NOTES: they need a CUDA torch and
torchvision beside which the project's CPU torch cannot live):
    python3 -m venv /tmp/peers-venv && /tmp/peers-venv/bin/pip install streaming-community litdata
The corpus is the demo's domain corpus (standard-library source) repeated --copies times
(default 8: ~1.4k documents, ~6M tokens), prepared into 32 shards; the demo's BPE tokenizer.
Everyone tokenizes with the same Rust `encode_batch` and packs 512-token sequences; tokens/s is
measured after the first 8 sequences; the tokenizer's thread pool is off for all, as in training.
Runs are interleaved; medians are printed. With --s3 every reader streams from an S3 server
process on loopback (moto_server, started here) instead: raycpt straight into memory, the peers
through a fresh local cache folder per run (their design: download shards, then read them).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream import run_case, start_s3, use_s3  # noqa: E402


def corpus(work: Path, copies: int) -> tuple[Path, Path]:
    """The demo's domain corpus `copies` times over (each copy made distinct, so deduplication
    keeps it), prepared into 32 shards, and the demo's tokenizer (made if missing)."""
    from raycpt.config import PrepareConfig
    from raycpt.demo import _write_jsonl, domain_texts, train_tokenizer
    from raycpt.prepare import prepare

    data = work / f"data-x{copies}"
    if not (data / "manifest.json").exists():
        texts = [f"# copy {c}\n{t}" for c in range(copies) for t in domain_texts()]
        _write_jsonl(work / f"raw-x{copies}" / "domain.jsonl", texts)
        prepare(
            PrepareConfig(inputs=[str(work / f"raw-x{copies}")], output=str(data), min_shards=32)
        )
    if not (work / "tokenizer" / "tokenizer.json").exists():
        train_tokenizer(domain_texts()[:300], work / "tokenizer")
    return data, work / "tokenizer"


def export_docs(data: Path, out: Path) -> None:
    """The prepared documents, in manifest order, as the peers' input."""
    import pyarrow.parquet as pq

    from raycpt.prepare import load_manifest

    with open(out, "w") as f:
        for shard in load_manifest(str(data))["splits"]["train"]["shards"]:
            for text in pq.read_table(data / shard["path"], columns=["text"]).column("text"):
                f.write(json.dumps({"text": text.as_py()}) + "\n")


def upload(folder: Path, uri: str) -> str:
    from raycpt import storage

    storage.upload_dir(str(folder), uri)
    return uri


def measure(args, where: dict, tok: Path, reader: str, endpoint: str | None) -> dict:
    env = dict(os.environ)
    if endpoint:  # each peer's S3 client finds the server through its own variable
        env.update(S3_ENDPOINT_URL=endpoint, AWS_ENDPOINT_URL=endpoint)
    rates: dict[str, list[float]] = {"raycpt": [], "mds": [], "litdata": []}
    for _ in range(args.repeats):
        rates["raycpt"].append(run_case(where["raycpt"], str(tok), 1, endpoint)[0])
        for kind in ("mds", "litdata"):
            with tempfile.TemporaryDirectory(dir=args.workdir) as cache:
                cmd = [
                    args.peer_python,
                    reader,
                    "read",
                    kind,
                    where[kind],
                    str(tok / "tokenizer.json"),
                ]
                out = subprocess.run(
                    cmd + ([cache] if endpoint else []),
                    check=True,
                    capture_output=True,
                    text=True,
                    env=env,
                ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rates[kind].append(r["tokens"] / r["seconds"])
    return rates


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--peer-python", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--copies", type=int, default=8, help="times the demo corpus is repeated")
    p.add_argument("--workdir", default="/tmp/raycpt-bench-peers")
    p.add_argument("--s3", action="store_true", help="read from a loopback S3 server")
    args = p.parse_args()
    # as in training (launch.DEFAULT_ENV): the tokenizer's own thread pool off, for everyone
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    work = Path(args.workdir)
    data, tok = corpus(work, args.copies)
    reader = str(Path(__file__).with_name("peer_reader.py"))
    peers = work / f"peers-x{args.copies}"
    if not (peers / "mds" / "index.json").exists():
        docs = work / f"docs-x{args.copies}.jsonl"
        export_docs(data, docs)
        subprocess.run([args.peer_python, reader, "write", str(docs), str(peers)], check=True)
    server, endpoint = start_s3() if args.s3 else (None, None)
    try:
        where = {"raycpt": str(data), "mds": str(peers / "mds"), "litdata": str(peers / "litdata")}
        if endpoint:
            use_s3(endpoint)
            where = {k: upload(Path(v), f"s3://bench/{k}") for k, v in where.items()}
        rates = measure(args, where, tok, reader, endpoint)
    finally:
        if server:
            server.terminate()
    med = {k: statistics.median(v) for k, v in rates.items()}
    best_peer = max(med["mds"], med["litdata"])
    print(
        json.dumps(
            {
                "median_tokens_per_s": med,
                "all": rates,
                "raycpt_vs_best_peer": med["raycpt"] / best_peer,
            }
        )
    )


if __name__ == "__main__":
    main()
