"""Throughput of the augmentation stage: in-process, and on the Ray actor pool with 1 and 2 actors.

    python bench/augment.py [--docs 2000] [--repeats 3]

Documents are the demo's domain corpus (standard-library source files, ~1.3k docs, cycled);
transforms: lexicon (a small Python-domain lexicon), noise, format and sentence, every document
touched (p = 1). Two caller threads send 64-document requests, as two training workers' readers
would. Prints docs/s and tokens/s (tokens of the augmented text, demo tokenizer) per case.
"""

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

LEXICON = """\
function | func | routine
argument | arg | parameter
dictionary | dict | mapping
exception | error
string | str
integer | int
"""


def config(lexicon: str, actors: int):
    from raycpt.config import AugmentConfig

    return AugmentConfig(
        enabled=True,
        transforms=[
            {"type": "lexicon", "path": lexicon, "rate": 0.5, "p": 1.0},
            {"type": "noise", "rate": 0.01, "p": 1.0},
            {"type": "format", "p": 1.0},
            {"type": "sentence", "p": 1.0},
        ],
        pool={"min_actors": actors, "max_actors": actors, "batch_docs": 64},
    )


def measure(transform, texts: list[str], callers: int = 2) -> float:
    """Documents/s when `callers` threads split the documents in units of 256."""
    units = [texts[i : i + 256] for i in range(0, len(texts), 256)]
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                if not units:
                    return
                unit = units.pop()
            transform(unit, [str(hash(t)) for t in unit], 0, 0.5)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from raycpt.augment_pool import deploy, local_transform, pool_transform, shutdown
    from raycpt.demo import domain_texts
    from raycpt.train.launch import init_ray

    corpus = domain_texts()
    texts = [corpus[i % len(corpus)] for i in range(args.docs)]
    lexicon = Path(tempfile.mkdtemp()) / "lexicon.txt"
    lexicon.write_text(LEXICON)
    tokens_per_doc = None
    tok_path = Path("/tmp/raycpt-bench/tokenizer")
    if tok_path.exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_path)
        sample = local_transform(config(str(lexicon), 0))(
            texts[:200], [str(i) for i in range(200)], 0, 0.5
        )[0]
        tokens_per_doc = sum(len(x) for x in tok(sample)["input_ids"]) / 200
    init_ray()
    cases = {"in-process (1 thread per caller)": lambda: local_transform(config(str(lexicon), 0))}
    for n in (1, 2):
        cases[f"pool, {n} actor(s)"] = n
    for name, case in cases.items():
        if isinstance(case, int):
            app = deploy(config(str(lexicon), case), f"bench{case}")
            transform = pool_transform(app, 64)
        else:
            app, transform = None, case()
        measure(transform, texts[:256])  # warm-up
        rates = [measure(transform, texts) for _ in range(args.repeats)]
        if app:
            shutdown(app)
        rate = statistics.median(rates)
        print(
            json.dumps(
                {
                    "case": name,
                    "docs_per_s": rate,
                    "tokens_per_s": rate * tokens_per_doc if tokens_per_doc else None,
                    "runs": rates,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
