"""Shared fixtures: one real Ray cluster per test session, a tokenizer trained here, a tiny Llama
built from a config, and small prepared corpora. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import synthetic_docs, tiny_llama_fields, write_jsonl

REPO = Path(__file__).resolve().parents[1]
# Ray Serve's handle threads call Ray after the session's cluster is gone; without this they
# would quietly start a fresh local Ray at interpreter exit. Tests always connect explicitly.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"

# Set before the cluster starts: Ray workers inherit the environment of `ray start`.
CLUSTER_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "TORCH_EXTENSIONS_DIR": os.path.expanduser("~/.cache/raycpt/torch_extensions"),
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    # test-only plug-ins (tests/augment_plugins.py) must import inside Ray actors too
    "PYTHONPATH": str(Path(__file__).resolve().parent),
    # as with an activated virtual environment: a job's `python` is the one running the tests
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    # the augmentation pool's replicas report their own load to Serve's autoscaler (instead of
    # every caller's handle), so its growth does not hinge on the test process's handle threads
    "RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE": "0",
}
DASHBOARD_PORT = 8275
GCS_PORT = 6399


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


S3_BUCKET = "raycpt-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server process (moto_server) on loopback, with authentication on:
    an IAM user and access key are created first, and only that key is accepted afterwards.
    The test process and the Ray cluster reach it over HTTP with the standard AWS variables."""
    import boto3

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
        stdout=log,
        stderr=log,
    )
    wait_port(port)
    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
    )
    iam.create_user(UserName="raycpt")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="raycpt", PolicyName="all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="raycpt")["AccessKey"]
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    os.environ.update(env)
    CLUSTER_ENV.update(env)
    from raycpt import storage

    storage._S3.reset()
    storage._S3.client().create_bucket(Bucket=S3_BUCKET)
    yield {"endpoint": endpoint, "port": port, "bucket": S3_BUCKET, **env}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real local Ray head (dashboard + job API on loopback); the test process connects to it.
    Started after the S3 server, so that its workers inherit the S3 endpoint and credentials."""
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
    from ray import serve

    serve.shutdown()  # stop Serve's handle threads before the connection goes
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
