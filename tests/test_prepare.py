"""`prepare`: cleaning, dedup, shards + manifest with hashes and provenance, clear errors."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import synthetic_docs, write_jsonl

from raycpt.config import PrepareConfig
from raycpt.prepare import PrepareError, clean_text, load_manifest, prepare


def read_split(out, split):
    manifest = json.loads((out / "manifest.json").read_text())
    rows = []
    for shard in manifest["splits"][split]["shards"]:
        rows.extend(pq.read_table(out / shard["path"]).to_pylist())
    return manifest, rows


def test_mixed_inputs_cleaned_deduplicated_with_provenance(tmp_path):
    raw = tmp_path / "raw"
    write_jsonl(raw / "a.jsonl", ["caf\u0065\u0301 menu " * 5, "dup document text here", "x"])
    (raw / "sub").mkdir()
    (raw / "sub" / "b.txt").write_text("dup document text here")  # exact duplicate of a.jsonl:2
    (raw / "sub" / "c.txt").write_text("line one   \r\nline two\x00\n\n\n\nend of the document")
    pq.write_table(
        pa.table({"body": ["a parquet document with enough text", "  "]}), raw / "d.parquet"
    )
    (raw / "ignored.md").write_text("not an input type")

    cfg = PrepareConfig(
        inputs=[str(raw)],
        output=str(tmp_path / "out"),
        min_chars=10,
        min_shards=2,
        text_field="text",
    )
    # parquet column is called "body": a clear error names the column and the fix
    with pytest.raises(PrepareError, match="no column 'text'.*set text_field"):
        prepare(cfg)
    pq.write_table(
        pa.table({"text": ["a parquet document with enough text", "  "]}), raw / "d.parquet"
    )
    manifest = prepare(cfg)

    _, rows = read_split(tmp_path / "out", "train")
    texts = [r["text"] for r in rows]
    assert "caf\u00e9 menu" in texts[0]  # NFC: e + combining accent -> one code point
    assert texts.count("dup document text here") == 1
    assert "line one\nline two\n\nend of the document" in texts  # CRLF, NUL, blank runs, trailing
    assert manifest["documents_in"] == 7
    assert manifest["dropped"] == {"empty": 1, "exact_duplicate": 1, "too_short": 1}
    sources = {r["text"]: r["source"] for r in rows}
    assert sources["dup document text here"].endswith("a.jsonl:2")
    assert sources["a parquet document with enough text"].endswith("d.parquet#0")
    assert all(r["id"] == hashlib.sha256(r["text"].encode()).hexdigest()[:24] for r in rows)


def test_manifest_hashes_counts_and_determinism(tmp_path):
    write_jsonl(tmp_path / "raw" / "docs.jsonl", synthetic_docs(100))
    cfg = PrepareConfig(
        inputs=[str(tmp_path / "raw")], output=str(tmp_path / "o1"), shard_docs=30, min_shards=2
    )
    m1 = prepare(cfg)
    shards = m1["splits"]["train"]["shards"]
    assert len(shards) == 4  # ceil(100 / 30)
    assert sum(s["num_docs"] for s in shards) == m1["splits"]["train"]["num_docs"] == 100
    for s in shards:
        data = (tmp_path / "o1" / s["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"]
        assert pq.read_metadata(tmp_path / "o1" / s["path"]).num_rows == s["num_docs"]
    m2 = prepare(cfg.model_copy(update={"output": str(tmp_path / "o2")}))
    assert [s["sha256"] for s in m2["splits"]["train"]["shards"]] == [s["sha256"] for s in shards]


def test_small_corpus_is_split_into_min_shards(tmp_path):
    write_jsonl(tmp_path / "raw" / "docs.jsonl", synthetic_docs(20))
    m = prepare(
        PrepareConfig(inputs=[str(tmp_path / "raw")], output=str(tmp_path / "o"), min_shards=8)
    )
    assert len(m["splits"]["train"]["shards"]) == 8


def test_heldout_split_is_disjoint_including_duplicates(tmp_path):
    docs = synthetic_docs(300)
    write_jsonl(tmp_path / "raw" / "a.jsonl", docs)
    write_jsonl(tmp_path / "raw" / "b.jsonl", docs[:100])  # duplicates of some documents
    out = tmp_path / "o"
    prepare(
        PrepareConfig(
            inputs=[str(tmp_path / "raw")], output=str(out), heldout_fraction=0.2, dedup="none"
        )
    )
    _, train = read_split(out, "train")
    _, held = read_split(out, "heldout")
    assert 30 < len({r["id"] for r in held}) < 90
    assert not {r["text"] for r in train} & {r["text"] for r in held}


def test_clean_text_keeps_tabs_and_normalises():
    assert clean_text("a\tb  \r\nc\x07", "NFC") == "a\tb\nc"
    assert clean_text("\uff21", "NFKC") == "A"


def test_empty_corpus_is_a_clear_error_and_writes_nothing(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.txt").write_text("short")
    out = tmp_path / "o"
    with pytest.raises(PrepareError, match=r"no documents left to train on.*too_short"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "raw")], output=str(out)))
    assert not (out / "manifest.json").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="no .txt, .jsonl or .parquet files"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "empty")], output=str(out)))


def test_non_utf8_is_skipped_or_fails_as_configured(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "good.txt").write_text("a perfectly good document of text")
    (raw / "bad.txt").write_bytes(b"latin-1 caf\xe9 text that is long enough")
    before = (raw / "bad.txt").read_bytes()
    m = prepare(PrepareConfig(inputs=[str(raw)], output=str(tmp_path / "o")))
    assert m["dropped"] == {"not_utf8": 1}
    with pytest.raises(PrepareError, match=r"bad.txt is not valid UTF-8 \(byte 11\)"):
        prepare(
            PrepareConfig(inputs=[str(raw)], output=str(tmp_path / "o2"), on_decode_error="fail")
        )
    assert (raw / "bad.txt").read_bytes() == before  # input untouched


def test_missing_manifest_is_explained(tmp_path):
    with pytest.raises(PrepareError, match="has no manifest.json.*run prepare again"):
        load_manifest(str(tmp_path))
