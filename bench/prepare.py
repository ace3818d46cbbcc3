"""Documents/s and MB/s of `raycpt prepare`, local and on Ray Data with 1 and 2 CPUs, exact dedup
only vs the full curation pipeline; and PyPI `datatrove`'s MinHash dedup as a peer.

    python bench/prepare.py [--docs 20000] [--files 64] [--workdir /tmp/raycpt-bench-prepare]
        [--datatrove-python /tmp/dtvenv/bin/python]

The corpus: documents of 6-14 sentences drawn from the Python language reference (pydoc_data,
real English), 10 % of them near copies (3 % of characters substituted), 5 % exact copies, 10 %
with an e-mail address, a phone number and an MRN; written as `--files` jsonl files. Each case
runs in a fresh process (a fresh local Ray with --num-cpus for the ray cases) and times
`prepare()` alone. datatrove runs in its own venv (it is not a raycpt dependency; `pip install
datatrove "xxhash<4"` there), its four MinHash stages with LocalPipelineExecutor(tasks=files,
workers=N). Prints one JSON line per case.
"""

import argparse
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

FULL = {
    "pii": {"enabled": True, "patterns": {"mrn": r"MRN[: ]*\d{6,10}"}},
    "quality": {
        "max_chars": 100_000,
        "min_alpha_ratio": 0.6,
        "max_repeated_line_ratio": 0.3,
        "max_repeated_ngram_ratio": 0.3,
        "languages": ["en"],
    },
    "near_dedup": {"enabled": True, "threshold": 0.7},
}
CASES = {"exact": {}, "near": {"near_dedup": FULL["near_dedup"]}, "full": FULL}


def make_corpus(raw: Path, n_docs: int, n_files: int) -> None:
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values())
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 < len(s.strip()) < 400]
    rng = random.Random(0)
    docs = []
    for i in range(n_docs):
        doc = " ".join(rng.choice(sentences) for _ in range(rng.randint(6, 14)))
        if rng.random() < 0.10:
            doc += f" Contact j.doe{i}@example.org or +1 (555) 010-{i % 10000:04d}, MRN: {i:08d}."
        docs.append(doc)
    for i in rng.sample(range(n_docs), n_docs // 10):
        chars = list(docs[i])
        for j in rng.sample(range(len(chars)), len(chars) * 3 // 100):
            chars[j] = rng.choice("abcdefghijklmnopqrstuvwxyz")
        docs.append("".join(chars))
    docs += rng.sample(docs, n_docs // 20)
    rng.shuffle(docs)
    raw.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        lines = "".join(json.dumps({"text": d}) + "\n" for d in docs[f::n_files])
        (raw / f"part-{f:04d}.jsonl").write_text(lines)


def run_case(raw: str, out: str, engine: str, cpus: int, case: str) -> dict:
    """One timed prepare() in this process (called in a child process)."""
    import ray

    from raycpt.config import PrepareConfig
    from raycpt.prepare import prepare

    if engine == "ray":
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
    cfg = PrepareConfig(
        inputs=[raw], output=out, engine=engine, workers=cpus, min_shards=2, **CASES[case]
    )
    t0 = time.perf_counter()
    m = prepare(cfg)
    elapsed = time.perf_counter() - t0
    return {
        "engine": engine,
        "cpus": cpus,
        "case": case,
        "seconds": round(elapsed, 2),
        "docs_per_s": round(m["documents_in"] / elapsed),
        "mb_per_s": round(m["bytes_read"] / elapsed / 1e6, 2),
        "documents_in": m["documents_in"],
        "documents_out": m["documents_out"],
        "dropped": m["dropped"],
        "shards": {k: [s["sha256"][:12] for s in v["shards"]] for k, v in m["splits"].items()},
    }


DATATROVE = r"""
import sys, time, json
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets,
    MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.word_tokenizers import WordTokenizer

class Whitespace(WordTokenizer):  # NLTK's punkt data cannot be downloaded here
    def word_tokenize(self, text): return text.split()
    def sent_tokenize(self, text): return [text]
    def span_tokenize(self, text): raise NotImplementedError

raw, work, files, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = MinhashConfig()
tok = Whitespace()
stages = [
    [JsonlReader(raw), MinhashDedupSignature(f"{work}/sigs", config=cfg, language=tok)],
    [MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=cfg)],
    [MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=cfg)],
    [JsonlReader(raw), MinhashDedupFilter(f"{work}/remove"), JsonlWriter(f"{work}/out")],
]
tasks = [files, cfg.num_buckets, 1, files]
t0 = time.perf_counter()
for i, (pipe, n) in enumerate(zip(stages, tasks)):
    LocalPipelineExecutor(pipe, tasks=n, workers=workers, logging_dir=f"{work}/logs{i}",
                          skip_completed=False).run()
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def run_datatrove(python: str, raw: Path, work: Path, files: int, workers: int) -> dict:
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    res = subprocess.run(
        [python, "-c", DATATROVE, str(raw), str(work), str(files), str(workers)],
        capture_output=True,
        text=True,
    )
    if res.returncode:
        return {"engine": "datatrove", "error": res.stderr[-2000:]}
    seconds = json.loads(res.stdout.strip().splitlines()[-1])["seconds"]
    kept = sum(1 for f in (work / "out").glob("*.jsonl*") for _ in _lines(f))
    total = sum(1 for f in raw.glob("*.jsonl") for _ in f.open())
    size = sum(f.stat().st_size for f in raw.glob("*.jsonl"))
    return {
        "engine": "datatrove-minhash",
        "cpus": workers,
        "case": "near",
        "seconds": round(seconds, 2),
        "docs_per_s": round(total / seconds),
        "mb_per_s": round(size / seconds / 1e6, 2),
        "documents_in": total,
        "documents_out": kept,
    }


def _lines(path: Path):
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        yield from f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--workdir", default="/tmp/raycpt-bench-prepare")
    parser.add_argument("--datatrove-python", default="/tmp/dtvenv/bin/python")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        raw, out, engine, cpus, case = args.child
        print(json.dumps(run_case(raw, out, engine, int(cpus), case)), flush=True)
        return
    work = Path(args.workdir)
    raw = work / "raw"
    if not raw.exists():
        make_corpus(raw, args.docs, args.files)
    for engine, cpus in (("local", 1), ("ray", 1), ("ray", 2)):
        for case in CASES:
            out = work / f"out-{engine}-{cpus}-{case}"
            child = [sys.executable, __file__, "--child", str(raw), str(out), engine, str(cpus)]
            res = subprocess.run(child + [case], capture_output=True, text=True)
            lines = res.stdout.strip().splitlines()
            print(lines[-1] if res.returncode == 0 else res.stderr[-2000:], flush=True)
    if Path(args.datatrove_python).exists():
        for workers in (1, 2):
            result = run_datatrove(args.datatrove_python, raw, work / "dt", args.files, workers)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
