"""Shared fixtures: one real Ray cluster per test session, a tokenizer trained here, a tiny Llama
built from a config, and small prepared corpora. Nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import synthetic_docs, tiny_llama_fields, write_jsonl

REPO = Path(__file__).resolve().parents[1]

# Set before the cluster starts: Ray workers inherit the environment of `ray start`.
CLUSTER_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "TORCH_EXTENSIONS_DIR": os.path.expanduser("~/.cache/raycpt/torch_extensions"),
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
}
DASHBOARD_PORT = 8275
GCS_PORT = 6399


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray head (dashboard + job API on loopback); the test process connects to it."""
    import ray

    env = {**os.environ, **CLUSTER_ENV}
    os.environ.update(CLUSTER_ENV)
    subprocess.run([ray_cli(), "stop", "--force"], env=env, capture_output=True)
    subprocess.run(
        [
            ray_cli(),
            "start",
            "--head",
            "--num-cpus=8",
            "--node-ip-address=127.0.0.1",
            f"--port={GCS_PORT}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={DASHBOARD_PORT}",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    address = f"127.0.0.1:{GCS_PORT}"
    ray.init(address=address, logging_level="WARNING")
    yield {"address": address, "dashboard": f"http://127.0.0.1:{DASHBOARD_PORT}"}
    ray.shutdown()
    subprocess.run([ray_cli(), "stop", "--force"], env=env, capture_output=True)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained in the test session."""
    from raycpt.demo import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(synthetic_docs(300, seed=1), out, vocab_size=300)
    return out


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny Llama built from a LlamaConfig (random weights), saved with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    fields = tiny_llama_fields(len(tok))
    fields.pop("model_type")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    out = tmp_path_factory.mktemp("base-model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def domain_dataset(tmp_path_factory) -> Path:
    """A prepared domain corpus (16 shards, with a held-out split)."""
    from raycpt.config import PrepareConfig
    from raycpt.prepare import prepare

    root = tmp_path_factory.mktemp("domain")
    write_jsonl(root / "raw" / "docs.jsonl", synthetic_docs(400, seed=2))
    out = root / "prepared"
    prepare(
        PrepareConfig(
            inputs=[str(root / "raw")], output=str(out), min_shards=16, heldout_fraction=0.1
        )
    )
    return out


@pytest.fixture
def run_config(tmp_path, base_model_dir, domain_dataset):
    """A factory for small, valid run configs (as dicts) writing under tmp_path."""

    def make(**overrides) -> dict:
        cfg = {
            "name": "run",
            "storage_path": str(tmp_path / "runs"),
            "seed": 0,
            "model": {"path": str(base_model_dir)},
            "data": {"sources": [{"name": "domain", "path": str(domain_dataset)}], "seq_len": 64},
            "train": {
                "max_steps": 20,
                "micro_batch_size": 4,
                "global_batch_size": 8,
                "lr": 3e-3,
                "log_every": 5,
                "schedule": {"warmup_steps": 3, "min_lr_ratio": 0.1},
            },
            "deepspeed": {"zero_stage": 2},
            "checkpoint": {"every_steps": 10, "num_to_keep": 2},
            "scaling": {"num_workers": 2},
        }
        for key, value in overrides.items():
            node = cfg
            *path, last = key.split("__")
            for p in path:
                node = node[p]
            node[last] = value
        return cfg

    return make
