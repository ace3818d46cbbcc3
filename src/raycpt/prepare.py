"""`raycpt prepare`: raw text (txt / jsonl / parquet) into cleaned, deduplicated Parquet shards plus
a manifest that records hashes, counts and provenance.

Layout at the output location::

    manifest.json                  written last: a manifest that exists describes complete shards
    train/shard-00000.parquet      columns: id, text, source, n_chars
    heldout/shard-00000.parquet    only with heldout_fraction > 0

A document's id is a hash of its cleaned text, so exact duplicates share an id and always land in
the same split: no held-out document, nor a copy of it, is ever trained on.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from raycpt import storage
from raycpt.config import PrepareConfig, config_digest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("n_chars", pa.int32()),
        ("difficulty", pa.float32()),  # null unless prepared with a difficulty
        ("group", pa.string()),  # null unless prepared with a group_field
    ]
)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BLANK_RUNS = re.compile(r"\n{3,}")


class PrepareError(RuntimeError):
    """The input cannot be turned into a dataset; the message says why and what to change."""


@dataclass
class Stats:
    """Counts of what `prepare` read, kept and dropped, recorded in the manifest."""

    files: int = 0
    documents_in: int = 0
    dropped: Counter = field(default_factory=Counter)


def clean_text(text: str, normalization: str) -> str:
    """Unicode-normalise, drop control characters, unify newlines and trim trailing blanks."""
    if normalization != "none":
        text = unicodedata.normalize(normalization, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def doc_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def _decode(raw: bytes, where: str, cfg: PrepareConfig, stats: Stats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if cfg.on_decode_error == "fail":
            raise PrepareError(
                f"{where} is not valid UTF-8 (byte {err.start}); convert it, or set "
                "on_decode_error: skip to drop such input"
            ) from None
        stats.dropped["not_utf8"] += 1
        return None


def _extra_fields(cfg: PrepareConfig) -> list[str]:
    return [f for f in (cfg.difficulty_field, cfg.group_field) if f]


def read_documents(uri: str, cfg: PrepareConfig, stats: Stats) -> Iterator[tuple[str, str, dict]]:
    """Yield (raw text, provenance, extra fields) for every document in one input file."""
    if uri.endswith(".txt"):
        text = _decode(storage.read_bytes(uri), uri, cfg, stats)
        if text is not None:
            yield text, uri, {}
    elif uri.endswith(".jsonl"):
        for n, line in enumerate(storage.read_bytes(uri).split(b"\n"), start=1):
            if not line.strip():
                continue
            where = f"{uri}:{n}"
            decoded = _decode(line, where, cfg, stats)
            if decoded is None:
                continue
            try:
                record = json.loads(decoded)
            except json.JSONDecodeError as err:
                raise PrepareError(f"{where}: not valid JSON ({err.msg})") from None
            text = record.get(cfg.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise PrepareError(f"{where}: no string field {cfg.text_field!r}; set text_field")
            yield text, where, {f: record.get(f) for f in _extra_fields(cfg)}
    elif uri.endswith(".parquet"):
        table = pq.read_table(pa.BufferReader(storage.read_bytes(uri)))
        if cfg.text_field not in table.column_names:
            raise PrepareError(
                f"{uri}: no column {cfg.text_field!r} (columns: {table.column_names}); "
                "set text_field"
            )
        extra = {
            f: table.column(f).to_pylist() for f in _extra_fields(cfg) if f in table.column_names
        }
        for n, text in enumerate(table.column(cfg.text_field).to_pylist()):
            if text is not None:
                yield text, f"{uri}#{n}", {f: v[n] for f, v in extra.items()}


def _field_score(extra: dict, cfg: PrepareConfig, where: str) -> float:
    value = extra.get(cfg.difficulty_field)
    if not isinstance(value, int | float):
        raise PrepareError(
            f"{where}: difficulty_field {cfg.difficulty_field!r} is not a number (got {value!r})"
        )
    return float(value)


_WORD = re.compile(r"\w+")


def score_and_sort(splits: dict[str, list[dict]], method: str) -> None:
    """Give every document a difficulty and order each split from easiest to hardest.

    length: characters; rarity: the mean surprisal -log p(word) of its words under the word
    frequencies of the whole corpus (rare vocabulary reads as harder); field: a user's column.
    Ties break by id, so the order (and the shards' hashes) are reproducible.
    """
    if method == "rarity":
        counts = Counter(
            w.lower() for docs in splits.values() for d in docs for w in _WORD.findall(d["text"])
        )
        total = sum(counts.values())
        for docs in splits.values():
            for d in docs:
                words = [w.lower() for w in _WORD.findall(d["text"])]
                d["difficulty"] = (
                    sum(math.log(total / counts[w]) for w in words) / len(words) if words else 0.0
                )
    elif method == "length":
        for docs in splits.values():
            for d in docs:
                d["difficulty"] = float(d["n_chars"])
    for docs in splits.values():
        docs.sort(key=lambda d: (d["difficulty"], d["id"]))


def _in_heldout(did: str, cfg: PrepareConfig) -> bool:
    if cfg.heldout_fraction <= 0:
        return False
    h = hashlib.sha256(f"{cfg.seed}:{did}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < cfg.heldout_fraction


def collect(cfg: PrepareConfig) -> tuple[dict[str, list[dict]], Stats]:
    """Read, clean, filter and deduplicate every input; return documents per split."""
    stats = Stats()
    files: list[str] = []
    for uri in cfg.inputs:
        files.extend(storage.list_files(uri, INPUT_SUFFIXES))
    if not files:
        raise PrepareError(f"no .txt, .jsonl or .parquet files found under {cfg.inputs}")
    stats.files = len(files)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    for uri in tqdm(files, desc="prepare", unit="file", disable=len(files) < 20):
        for raw, where, extra in read_documents(uri, cfg, stats):
            stats.documents_in += 1
            text = clean_text(raw, cfg.normalization)
            if not text:
                stats.dropped["empty"] += 1
                continue
            if len(text) < cfg.min_chars:
                stats.dropped["too_short"] += 1
                continue
            did = doc_id(text)
            if cfg.dedup == "exact":
                if did in seen:
                    stats.dropped["exact_duplicate"] += 1
                    continue
                seen.add(did)
            split = "heldout" if _in_heldout(did, cfg) else "train"
            group = extra.get(cfg.group_field) if cfg.group_field else None
            splits[split].append(
                {
                    "id": did,
                    "text": text,
                    "source": where,
                    "n_chars": len(text),
                    "difficulty": _field_score(extra, cfg, where)
                    if cfg.difficulty == "field"
                    else None,
                    "group": None if group is None else str(group),
                }
            )
    if cfg.difficulty != "none":
        score_and_sort(splits, cfg.difficulty)
    if not splits["train"]:
        raise PrepareError(
            f"no documents left to train on: read {stats.documents_in} from {stats.files} files, "
            f"dropped {dict(stats.dropped)}; check the inputs, min_chars and heldout_fraction"
        )
    return splits, stats


def _shard_bytes(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=1024)
    return buf.getvalue()


def write_split(cfg: PrepareConfig, split: str, docs: list[dict]) -> list[dict]:
    """Write one split's documents as evenly sized shards; return their manifest entries."""
    n_shards = max(math.ceil(len(docs) / cfg.shard_docs), min(cfg.min_shards, len(docs)))
    entries = []
    for i in tqdm(range(n_shards), desc=f"write {split}", unit="shard", disable=n_shards < 20):
        rows = docs[i * len(docs) // n_shards : (i + 1) * len(docs) // n_shards]
        data = _shard_bytes(rows)
        rel = f"{split}/shard-{i:05d}.parquet"
        storage.write_bytes(storage.join(cfg.output, rel), data)
        entries.append(
            {
                "path": rel,
                "sha256": hashlib.sha256(data).hexdigest(),
                "num_docs": len(rows),
                "num_chars": sum(r["n_chars"] for r in rows),
                "num_bytes": len(data),
            }
        )
    return entries


def prepare(cfg: PrepareConfig) -> dict:
    """Run the whole preparation and return the manifest that was written."""
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    manifest_uri = storage.join(cfg.output, MANIFEST)
    # Hide any earlier dataset at this location while its shards are being rewritten.
    storage.delete(manifest_uri)
    splits, stats = collect(cfg)
    manifest = {
        "version": MANIFEST_VERSION,
        "config_hash": config_digest(cfg),
        "inputs": cfg.inputs,
        "files_read": stats.files,
        "documents_in": stats.documents_in,
        "dropped": dict(sorted(stats.dropped.items())),
        "difficulty": cfg.difficulty,
        "splits": {},
    }
    for split, docs in splits.items():
        if not docs:
            continue
        shards = write_split(cfg, split, docs)
        groups = Counter(d["group"] for d in docs if d["group"] is not None)
        manifest["splits"][split] = {
            "num_docs": len(docs),
            "groups": dict(sorted(groups.items())),
            "num_chars": sum(s["num_chars"] for s in shards),
            "shards": shards,
        }
    storage.write_bytes(manifest_uri, json.dumps(manifest, indent=2).encode())
    log.info(
        "wrote %s: %s", manifest_uri, {k: v["num_docs"] for k, v in manifest["splits"].items()}
    )
    return manifest


def load_manifest(dataset: str) -> dict:
    """Read a dataset's manifest, with a clear error if the dataset is missing or incomplete."""
    uri = storage.join(dataset, MANIFEST)
    if not storage.exists(uri):
        raise PrepareError(
            f"{dataset} has no {MANIFEST}: it is not a prepared dataset, or `raycpt prepare` "
            "did not finish writing it; run prepare again"
        )
    manifest = json.loads(storage.read_bytes(uri))
    if manifest.get("version") != MANIFEST_VERSION:
        raise PrepareError(f"{uri}: manifest version {manifest.get('version')} is not supported")
    return manifest
