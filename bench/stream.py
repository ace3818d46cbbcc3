"""Tokens/s that the streaming loader delivers to a training loop, from S3 vs a local folder.

    python bench/stream.py [--repeats 3] [--workdir /tmp/raycpt-bench-stream]

The corpus is the demo's domain corpus (standard-library source, ~8 MB in 32 shards), tokenized by
the demo's BPE tokenizer and packed into 512-token sequences. The same shards are read from a local
folder and from an S3 server process on loopback (moto_server, started here), with read_ahead=2,
by 1 worker and by 2 workers (two processes, ranks 0 and 1 of 2, run at once). Each worker drains
one epoch (on_exhausted: stop); tokens/s is summed over workers. Prints one JSON line per case.
"""

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

SEQ = 512


def drain(dataset: str, tokenizer: str, rank: int, world: int, endpoint: str | None, q) -> None:
    if endpoint:
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_REGION="us-east-1",
        )
    from transformers import AutoTokenizer

    from raycpt.config import DataConfig, SourceConfig
    from raycpt.loader import CPTDataLoader, DataExhausted, Layout

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = DataConfig(
        sources=[SourceConfig(name="d", path=dataset)],
        seq_len=SEQ,
        read_ahead=2,
        on_exhausted="stop",
    )
    start = time.perf_counter()
    ld = CPTDataLoader(cfg, tok, 0, Layout(rank, world, 8, 1), 10_000)
    ld.next_step()
    t0 = time.perf_counter()  # steady state: after the first batch (client, manifest, shard 0)
    first = t0 - start
    steps = 0
    try:
        while True:
            ld.next_step()
            steps += 1
    except DataExhausted:
        pass
    elapsed = time.perf_counter() - t0
    ld.close()
    q.put((steps * 8 * SEQ, elapsed, first))


def run_case(dataset: str, tokenizer: str, world: int, endpoint: str | None) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=drain, args=(dataset, tokenizer, r, world, endpoint, q))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(t / e for t, e, _ in results), max(f for _, _, f in results)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def use_s3(endpoint: str, bucket: str = "bench") -> None:
    """Point this process (and its children) at the loopback server and create the bucket."""
    from raycpt import storage

    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
    )
    storage._S3.reset()
    storage._S3.client().create_bucket(Bucket=bucket)


def start_s3() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(2)
    return proc, f"http://127.0.0.1:{port}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default="/tmp/raycpt-bench-stream")
    args = p.parse_args()
    from raycpt import storage
    from raycpt.config import PrepareConfig
    from raycpt.demo import _write_jsonl, domain_texts, train_tokenizer
    from raycpt.prepare import prepare

    work = Path(args.workdir)
    local = work / "data"
    if not (local / "manifest.json").exists():
        _write_jsonl(work / "raw" / "domain.jsonl", domain_texts())
        prepare(PrepareConfig(inputs=[str(work / "raw")], output=str(local), min_shards=32))
        train_tokenizer(domain_texts()[:300], work / "tokenizer")
    s3, endpoint = start_s3()
    try:
        use_s3(endpoint)
        for f in sorted(local.rglob("*")):
            if f.is_file():
                storage.write_bytes(f"s3://bench/data/{f.relative_to(local)}", f.read_bytes())
        for world in (1, 2):
            rates = {"local": [], "s3": []}
            firsts = {"local": [], "s3": []}
            server_cpu = cpu_seconds(s3.pid)
            for _ in range(args.repeats):  # interleaved, so drift hits both alike
                for kind, where, ep in (
                    ("local", str(local), None),
                    ("s3", "s3://bench/data", endpoint),
                ):
                    rate, first = run_case(where, str(work / "tokenizer"), world, ep)
                    rates[kind].append(rate)
                    firsts[kind].append(first)
            med = {k: statistics.median(v) for k, v in rates.items()}
            print(
                json.dumps(
                    {
                        "workers": world,
                        "local_tokens_per_s": med["local"],
                        "s3_tokens_per_s": med["s3"],
                        "s3_cost": 1 - med["s3"] / med["local"],
                        "first_batch_s": {k: statistics.median(v) for k, v in firsts.items()},
                        "s3_server_cpu_s_per_run": (cpu_seconds(s3.pid) - server_cpu)
                        / args.repeats,
                        "runs": rates,
                    }
                ),
                flush=True,
            )
    finally:
        s3.terminate()


if __name__ == "__main__":
    main()
