"""Object storage against a real S3 server process on loopback (moto_server, authentication on),
spoken to over HTTP by boto3 and pyarrow exactly as in production."""

import json
import os
import signal
import subprocess
import sys
import threading
import tracemalloc
import uuid
from pathlib import Path

import pytest
from conftest import free_port, wait_port
from support import drain_loader, synthetic_docs, write_jsonl
from transformers import AutoTokenizer

from raycpt import storage
from raycpt.config import DataConfig, PrepareConfig, SourceConfig
from raycpt.loader import CPTDataLoader, Layout
from raycpt.prepare import prepare
from raycpt.stream import ShardError
from raycpt.train.engine import local_copy


def s3_prefix(s3_server, name: str) -> str:
    return f"s3://{s3_server['bucket']}/{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def big_s3_dataset(s3_server, tmp_path_factory):
    """~10 MB of text in 80 shards on S3: many times the reader's read-ahead."""
    raw = tmp_path_factory.mktemp("big")
    write_jsonl(raw / "docs.jsonl", synthetic_docs(4000, seed=5, min_words=400, max_words=500))
    out = s3_prefix(s3_server, "big")
    manifest = prepare(PrepareConfig(inputs=[str(raw)], output=out, shard_docs=50))
    return out, manifest


def loader(dataset, tok, rank=0, world=1, record=True, **data):
    cfg = DataConfig(sources=[SourceConfig(name="d", path=dataset)], seq_len=64, **data)
    return CPTDataLoader(cfg, tok, 3, Layout(rank, world, 4, 2), 1000, record_documents=record)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_prepare_writes_verified_shards_then_manifest_to_s3(s3_server, big_s3_dataset):
    out, manifest = big_s3_dataset
    listed = dict(storage.list_objects(out))
    assert f"{out}/manifest.json" in listed
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) == 80
    import hashlib

    for s in shards[:5]:
        assert hashlib.sha256(storage.read_bytes(f"{out}/{s['path']}")).hexdigest() == s["sha256"]
    assert json.loads(storage.read_bytes(f"{out}/manifest.json")) == manifest


def test_streaming_from_s3_holds_a_bounded_read_ahead(big_s3_dataset, tok):
    """Python-heap peak while streaming a whole ~10 MB corpus with read_ahead=2 stays a small
    fraction of the corpus, and training data arrives before most shards were read."""
    out, manifest = big_s3_dataset
    corpus_chars = manifest["splits"]["train"]["num_chars"]
    tracemalloc.start()
    ld = loader(
        out, tok, record=False, read_ahead=2, prefetch_batches=1, on_exhausted="stop", shuffle=False
    )
    ld.next_step()
    read_at_first_batch = sum(s.reader.bytes_read for s in ld.streams)
    drain_loader(ld)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    total_bytes = sum(s["num_bytes"] for s in manifest["splits"]["train"]["shards"])
    assert read_at_first_batch <= 4 * total_bytes / 80  # at most read-ahead + current (+1 racing)
    assert ld.streams[0].docs_started > 3900
    assert peak < corpus_chars / 4, f"peak {peak / 1e6:.1f} MB for {corpus_chars / 1e6:.1f} MB"


def test_network_cut_mid_stream_is_retried_and_loses_nothing(
    s3_server, big_s3_dataset, tok, monkeypatch
):
    """The path to the S3 server is cut (the forwarding process is killed: resets, then refused
    connections) and restored 2 s later; botocore's retries carry the stream over the gap and the
    documents consumed equal those of an uninterrupted stream, in the same order."""
    out, _ = big_s3_dataset
    expected = drain_loader(loader(out, tok, read_ahead=1, on_exhausted="stop"))

    port = free_port()
    proxy_cmd = [
        sys.executable,
        str(Path(__file__).with_name("tcp_proxy.py")),
        str(port),
        "127.0.0.1",
        str(s3_server["port"]),
    ]
    proxy = subprocess.Popen(proxy_cmd)
    wait_port(port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    storage._S3.reset()
    try:
        ld = loader(out, tok, read_ahead=1, on_exhausted="stop")
        for _ in range(20):
            ld.next_step()
        proxy.send_signal(signal.SIGKILL)
        proxy.wait()
        restart = threading.Timer(2.0, lambda: procs.append(subprocess.Popen(proxy_cmd)))
        procs: list = []
        restart.start()
        got = drain_loader(ld)
        restart.join()
    finally:
        for p in [proxy, *locals().get("procs", [])]:
            p.kill()
        monkeypatch.undo()
        storage._S3.reset()
    assert got == expected


def test_corrupted_shard_on_s3_is_named(s3_server, tmp_path, tok):
    write_jsonl(tmp_path / "raw" / "d.jsonl", synthetic_docs(80))
    out = s3_prefix(s3_server, "corrupt")
    manifest = prepare(PrepareConfig(inputs=[str(tmp_path / "raw")], output=out))
    victim = manifest["splits"]["train"]["shards"][2]["path"]
    data = bytearray(storage.read_bytes(f"{out}/{victim}"))
    data[100] ^= 1
    storage.write_bytes(f"{out}/{victim}", bytes(data))
    with pytest.raises(ShardError, match=f"{out}/{victim} does not match its manifest"):
        drain_loader(loader(out, tok, on_exhausted="stop", shuffle=False))


def test_missing_bucket_and_bad_credentials_fail_clearly(s3_server, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "raw" / "d.jsonl", synthetic_docs(20))
    with pytest.raises(storage.StorageError, match="the bucket does not exist.*NoSuchBucket"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "raw")], output="s3://no-such-bucket/x"))
    probe = f"s3://{s3_server['bucket']}/probe.txt"
    storage.write_bytes(probe, b"ok")
    try:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        storage._S3.reset()
        with pytest.raises(storage.StorageError, match="probe.txt: the secret key does not match"):
            storage.read_bytes(probe)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAKEY")
        storage._S3.reset()
        with pytest.raises(storage.StorageError, match="access key id is not known"):
            storage.read_bytes(probe)
    finally:
        monkeypatch.undo()
        storage._S3.reset()
    assert storage.read_bytes(probe) == b"ok"
    with pytest.raises(storage.StorageError, match="not found"):
        storage.read_bytes(f"s3://{s3_server['bucket']}/missing/object")


def upload_dir(local: Path, uri: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes(f"{uri}/{path.relative_to(local)}", path.read_bytes())


def test_base_model_from_s3_is_downloaded_once_per_node_and_keyed_by_etag(
    s3_server, base_model_dir, tmp_path, monkeypatch
):
    uri = s3_prefix(s3_server, "models/base")
    upload_dir(base_model_dir, uri)
    monkeypatch.setenv("RAYCPT_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = storage.download_dir
    monkeypatch.setattr(storage, "download_dir", lambda u, d: calls.append(u) or real(u, d))
    results = []
    threads = [threading.Thread(target=lambda: results.append(local_copy(uri))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(calls) == 1  # four workers, one download
    folder = Path(results[0])
    assert (folder / "config.json").read_bytes() == (base_model_dir / "config.json").read_bytes()
    assert local_copy(uri) == results[0] and len(calls) == 1
    cfg = json.loads((base_model_dir / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    storage.write_bytes(f"{uri}/config.json", json.dumps(cfg).encode())  # new ETag
    assert local_copy(uri) != results[0] and len(calls) == 2
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "cache" / "models").iterdir())
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in "".join(
        p.read_text(errors="ignore") for p in folder.rglob("*") if p.is_file()
    )


def test_large_objects_use_multipart_upload_and_round_trip(s3_server, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_BYTES", 5 * 2**20)  # S3's smallest part size
    data = os.urandom(12 * 2**20)
    uri = f"s3://{s3_server['bucket']}/multipart/blob.bin"
    storage.write_bytes(uri, data)
    etag = dict(storage.list_objects(f"s3://{s3_server['bucket']}/multipart"))[uri]
    assert etag.strip('"').endswith("-3")  # a multipart ETag: 3 parts of 5 MiB
    assert storage.read_bytes(uri) == data


def test_upload_dir_sends_last_after_every_other_file_and_not_at_all_after_a_failure(
    tmp_path, monkeypatch
):
    src = tmp_path / "part"
    for name in ("ds/a.pt", "ds/b.pt", "data/rank-00000.json", "parts/rank-00000.json"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(name.encode())
    order: list[str] = []
    put = storage._put_file

    def recording_put(path, local_dir, uri):
        order.append(os.path.relpath(path, local_dir))
        return put(path, local_dir, uri)

    monkeypatch.setattr(storage, "_put_file", recording_put)
    dest = tmp_path / "dest"
    (dest / "ds" / "b.pt").mkdir(parents=True)  # a folder where ds/b.pt must go
    with pytest.raises(storage.StorageError, match="b.pt"):
        storage.upload_dir(str(src), str(dest), last="parts/rank-00000.json")
    assert "parts/rank-00000.json" not in order
    assert not (dest / "parts").exists() and not (dest / "ds" / "a.pt").exists()  # taken back

    (dest / "ds" / "b.pt").rmdir()
    order.clear()
    written = storage.upload_dir(str(src), str(dest), last="parts/rank-00000.json")
    assert order[-1] == "parts/rank-00000.json" and len(order) == len(written) == 4
    assert (dest / "ds" / "b.pt").read_bytes() == b"ds/b.pt"
