"""Helpers shared by the tests: synthetic corpora and small model configs."""

import json
import random
import subprocess
import sys
import time
from pathlib import Path

WORDS = (
    "the patient was given aspirin for chest pain and the doctor ordered an ecg test "
    "blood pressure was normal heart rate increased after exercise the nurse recorded "
    "temperature dose of mg twice daily follow up in two weeks no known allergies"
).split()


def synthetic_docs(n: int, seed: int = 0, min_words: int = 20, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        docs.append(f"record {i}: " + " ".join(words) + ".")
    return docs


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def tiny_llama_fields(vocab: int) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }


def wait_for(predicate, timeout: float, interval: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def drain_loader(ld) -> list:
    """Run a loader to the end of its data (on_exhausted: stop), close it, and return the
    (doc id, epoch) pairs its streams recorded."""
    from raycpt.loader import DataExhausted

    try:
        while True:
            ld.next_step()
    except DataExhausted:
        pass
    ld.close()
    return [c for s in ld.streams for c in s.consumed or []]


def submit_job(dashboard: str, script: str, config: Path) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- python <script> --config <config>`, waited for."""
    return subprocess.run(
        [
            str(Path(sys.executable).with_name("ray")),
            "job",
            "submit",
            "--address",
            dashboard,
            "--working-dir",
            str(Path(__file__).resolve().parents[1]),
            "--",
            "python",
            script,
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
