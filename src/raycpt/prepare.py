"""`raycpt prepare`: raw text (txt / jsonl / parquet) into cleaned, filtered, redacted and
deduplicated Parquet shards plus a manifest that records hashes, counts and provenance.

The work runs in three steps, the same with either engine (``engine: local`` in this process,
``engine: ray`` as a Ray Data job over the cluster's CPUs)::

    curate   every input file -> one row per document: cleaned, PII-redacted text, its drop
             reason if a filter rejected it, its MinHash signature       (per file, in parallel)
    plan     exact and near-duplicate removal, held-out split by cluster, difficulty, order,
             shard assignment                          (global, on small columns, in the driver)
    write    shards from the curated rows                                (per shard, in parallel)

Only the plan sees the whole corpus, and it sorts by stable keys (file, position, id), so the
shards and their hashes do not depend on the engine or the number of workers.

Layout at the output location::

    manifest.json                  written last: a manifest that exists describes complete shards
    train/shard-00000.parquet      columns: id, text, source, n_chars
    heldout/shard-00000.parquet    only with heldout_fraction > 0

A document's id is a hash of its cleaned text, so exact duplicates share an id and always land in
the same split; near-duplicates are clustered before the split and only one per cluster is kept:
no held-out document, nor a near copy of it, is ever trained on.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raycpt import storage
from raycpt.config import PrepareConfig, config_digest
from raycpt.curate import (
    MinHasher,
    PiiRedactor,
    QualityFilter,
    load_user_filter,
    near_duplicate_clusters,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1  # later fields (drops, redactions, near_dedup) are additions
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
# one row per input document, kept or dropped: what `curate` hands to `plan` and `write`
DOC_SCHEMA = pa.schema(
    [
        ("file", pa.int32()),  # index of the input file in the sorted listing
        ("pos", pa.int32()),  # position of the document in its file
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("n_chars", pa.int32()),
        ("n_bytes", pa.int64()),  # raw UTF-8 bytes read
        ("difficulty", pa.float32()),
        ("group", pa.string()),
        ("drop", pa.string()),  # null if kept, else the reason
        ("redactions", pa.string()),  # JSON {type: count}, null if none
        ("minhash", pa.binary()),  # uint32 signature, null without near_dedup
    ]
)
AUTO_RAY_MIN_FILES = 64  # below this, Ray Data's start-up costs more than it saves
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BLANK_RUNS = re.compile(r"\n{3,}")


class PrepareError(RuntimeError):
    """The input cannot be turned into a dataset; the message says why and what to change."""


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


def _decode(raw: bytes, where: str, cfg: PrepareConfig) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if cfg.on_decode_error == "fail":
            raise PrepareError(
                f"{where} is not valid UTF-8 (byte {err.start}); convert it, or set "
                "on_decode_error: skip to drop such input"
            ) from None
        return None


def _extra_fields(cfg: PrepareConfig) -> list[str]:
    return [f for f in (cfg.difficulty_field, cfg.group_field) if f]


def read_documents(uri: str, cfg: PrepareConfig) -> Iterator[tuple[str | bytes, str, dict]]:
    """Yield (raw text, provenance, extra fields) for every document in one input file; the raw
    bytes instead of text where they are not UTF-8 (and on_decode_error is skip)."""
    if uri.endswith(".txt"):
        raw = storage.read_bytes(uri)
        text = _decode(raw, uri, cfg)
        yield (raw if text is None else text), uri, {}
    elif uri.endswith(".jsonl"):
        for n, line in enumerate(storage.read_bytes(uri).split(b"\n"), start=1):
            if not line.strip():
                continue
            where = f"{uri}:{n}"
            decoded = _decode(line, where, cfg)
            if decoded is None:
                yield line, where, {}
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


# ---------------------------------------------------------------------------------------------
# curate: one input file -> one row per document
# ---------------------------------------------------------------------------------------------


class FileCurator:
    """Reads input files and curates their documents. Built once per process (or Ray actor):
    the language model, the regexes and the user's filter load once, not per file."""

    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg
        self.redactor = PiiRedactor(cfg.pii) if cfg.pii.enabled else None
        self.quality = QualityFilter(cfg.quality)
        self.hasher = MinHasher(cfg.near_dedup) if cfg.near_dedup.enabled else None

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Ray Data's batch interface: a batch of {file index, uri} -> the documents' rows."""
        return pa.concat_tables(
            [
                self.curate_file(int(i), str(u))
                for i, u in zip(batch["file"], batch["uri"], strict=True)
            ]
        )

    def curate_file(self, index: int, uri: str) -> pa.Table:
        """Every document of one input file as a row (DOC_SCHEMA), in file order."""
        rows = [
            self.curate_document(raw, where, extra) | {"file": index, "pos": pos}
            for pos, (raw, where, extra) in enumerate(read_documents(uri, self.cfg))
        ]
        return pa.Table.from_pylist(rows, schema=DOC_SCHEMA)

    def curate_document(self, raw: str | bytes, where: str, extra: dict) -> dict:
        """Clean, redact, filter and sign one document; a dropped one keeps only its reason."""
        if isinstance(raw, bytes):
            return {"source": where, "n_bytes": len(raw), "drop": "not_utf8"}
        cfg = self.cfg
        row = {"source": where, "n_bytes": len(raw.encode("utf-8"))}
        text = clean_text(raw, cfg.normalization)
        redactions: Counter = Counter()
        if not text:
            return row | {"drop": "empty"}
        if len(text) < cfg.min_chars:
            return row | {"drop": "too_short"}
        if self.redactor is not None:
            n_chars = len(text)
            text, redactions, redacted_chars = self.redactor.redact(text)
            if cfg.pii.max_density is not None and redacted_chars > cfg.pii.max_density * n_chars:
                return row | {"drop": "pii_density"}
        reason = self.quality(text)
        if reason is not None:
            return row | {"drop": reason}
        group = extra.get(cfg.group_field) if cfg.group_field else None
        return row | {
            "id": doc_id(text),
            "text": text,
            "n_chars": len(text),
            "difficulty": _field_score(extra, cfg, where) if cfg.difficulty == "field" else None,
            "group": None if group is None else str(group),
            "redactions": json.dumps(dict(sorted(redactions.items()))) if redactions else None,
            "minhash": None if self.hasher is None else self.hasher.signature(text).tobytes(),
        }


def _curate_locally(files: list[str], cfg: PrepareConfig) -> list[pa.Table]:
    curator = FileCurator(cfg)
    tables, last_log = [], time.monotonic()
    for i, uri in enumerate(files):
        tables.append(curator.curate_file(i, uri))
        if time.monotonic() - last_log > 10:
            last_log = time.monotonic()
            log.info("curated %d/%d files: %s", i + 1, len(files), _progress(tables))
    return tables


def _curate_with_ray(files: list[str], cfg: PrepareConfig) -> list:
    """Curate the files on a Ray Data actor pool; return the blocks as object refs (the text
    stays in the cluster's object store, the driver only ever fetches small columns)."""
    import ray

    if cfg.quality.user_filter:  # fail here, with the key's name, rather than in every actor
        load_user_filter(cfg.quality.user_filter)
    workers = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = min(workers, len(files))
    items = [{"file": i, "uri": u} for i, u in enumerate(files)]
    # a few blocks per worker: enough to balance uneven files, few enough for many small ones
    ds = ray.data.from_items(items, override_num_blocks=min(len(files), workers * 4))
    ds = ds.map_batches(
        FileCurator,
        fn_constructor_args=(cfg,),
        batch_size=None,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
    )
    try:
        return ds.materialize().to_arrow_refs()
    except Exception as err:  # Ray wraps our errors; surface the message a user can act on
        cause = err
        while cause is not None and not isinstance(cause, PrepareError | storage.StorageError):
            cause = cause.__cause__
        raise (cause or err) from None


# ---------------------------------------------------------------------------------------------
# blocks: the curated rows, here or in the Ray object store
# ---------------------------------------------------------------------------------------------


class CuratedBlocks:
    """The curated rows as Arrow tables: in this process (local engine) or as Ray object refs.
    Runs a function on blocks where they are, so the text never passes through the driver."""

    def __init__(self, blocks: list, remote: bool):
        self.blocks = blocks
        self.remote = remote

    def map(self, fn: Callable, *args) -> list:
        """fn(*args, block) for every block, in block order."""
        return self.call(fn, [([i], args) for i in range(len(self.blocks))])

    def call(self, fn: Callable, calls: list[tuple[list[int], tuple]]) -> list:
        """fn(*args, *blocks) for each (block indices, args); results in call order."""
        if not self.remote:
            return [fn(*args, *[self.blocks[i] for i in ids]) for ids, args in calls]
        import ray

        task = ray.remote(num_cpus=1)(fn)
        return ray.get([task.remote(*args, *[self.blocks[i] for i in ids]) for ids, args in calls])


def _summary(block: pa.Table) -> pa.Table:
    return block.drop_columns(["text", "source"])


def _word_counts(rows: list[int], block: pa.Table) -> Counter:
    return Counter(
        w.lower() for t in block.column("text").take(rows).to_pylist() for w in _WORD.findall(t)
    )


def _rarity(rows: list[int], counts: Counter, block: pa.Table) -> list[float]:
    """Mean surprisal -log p(word) of each document's words under the corpus' word counts."""
    total = sum(counts.values())
    out = []
    for text in block.column("text").take(rows).to_pylist():
        words = [w.lower() for w in _WORD.findall(text)]
        out.append(sum(math.log(total / counts[w]) for w in words) / len(words) if words else 0.0)
    return out


def _progress(tables: list[pa.Table]) -> str:
    docs = sum(t.num_rows for t in tables)
    mb = sum(pc.sum(t.column("n_bytes")).as_py() or 0 for t in tables) / 1e6
    drops = Counter()
    for t in tables:
        drops.update(x for x in t.column("drop").to_pylist() if x)
    return f"{docs} documents, {mb:.1f} MB, dropped {dict(drops)}"


# ---------------------------------------------------------------------------------------------
# plan: global dedup, split, order, shards
# ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")


@dataclass
class Plan:
    """Which curated rows go to which shard, in which order, and what was dropped on the way."""

    documents_in: int
    bytes_in: int
    dropped: Counter
    near_duplicate_clusters: int
    # split -> shard -> rows as (block, row in block); difficulty and redactions alongside
    shards: dict[str, list[list[tuple[int, int]]]]
    difficulty: dict[str, list[list[float | None]]]
    redactions: dict[str, list[Counter]]
    groups: dict[str, Counter]


def _kept_after_dedup(summary: pa.Table, cfg: PrepareConfig, dropped: Counter) -> tuple[list, int]:
    """Rows (in file, position order) that survive the filters, exact and near dedup."""
    ids = summary.column("id").to_pylist()
    kept, seen = [], set()
    for i, (did, drop) in enumerate(zip(ids, summary.column("drop").to_pylist(), strict=True)):
        if drop is not None:
            dropped[drop] += 1
        elif cfg.dedup == "exact" and did in seen:
            dropped["exact_duplicate"] += 1
        else:
            seen.add(did)
            kept.append(i)
    clusters = 0
    if cfg.near_dedup.enabled and kept:
        sigs = summary.column("minhash").take(kept).to_pylist()
        matrix = np.frombuffer(b"".join(sigs), dtype=np.uint32).reshape(len(kept), -1)
        rep, clusters = near_duplicate_clusters(
            [ids[i] for i in kept], matrix, cfg.near_dedup.threshold
        )
        dropped["near_duplicate"] += int(np.sum(rep != np.arange(len(kept))))
        kept = [i for j, i in enumerate(kept) if rep[j] == j]
    return kept, clusters


def _in_heldout(did: str, cfg: PrepareConfig) -> bool:
    if cfg.heldout_fraction <= 0:
        return False
    h = hashlib.sha256(f"{cfg.seed}:{did}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < cfg.heldout_fraction


def _difficulties(
    summary: pa.Table, kept: pa.Array, cfg: PrepareConfig, blocks: CuratedBlocks
) -> list[float | None]:
    """Curriculum score of each kept row (length, a user's field, or corpus-relative rarity)."""
    if cfg.difficulty == "none":
        return [None] * len(kept)
    if cfg.difficulty == "length":
        return [float(n) for n in summary.column("n_chars").take(kept).to_pylist()]
    if cfg.difficulty == "field":
        return summary.column("difficulty").take(kept).to_pylist()
    # rarity: word counts over every kept document, then each document's mean surprisal
    where = summary.select(["_block", "_row"]).take(kept).to_pylist()
    per_block: dict[int, list[int]] = {}
    for r in where:
        per_block.setdefault(r["_block"], []).append(r["_row"])
    block_ids = sorted(per_block)
    counts: Counter = Counter()
    for c in blocks.call(_word_counts, [([b], (per_block[b],)) for b in block_ids]):
        counts.update(c)
    scores = blocks.call(_rarity, [([b], (per_block[b], counts)) for b in block_ids])
    by_row = {
        (b, r): s
        for b, block_scores in zip(block_ids, scores, strict=True)
        for r, s in zip(per_block[b], block_scores, strict=True)
    }
    return [by_row[(r["_block"], r["_row"])] for r in where]


def plan(summary: pa.Table, cfg: PrepareConfig, blocks: CuratedBlocks) -> Plan:
    """Decide the dataset from the small columns of every curated row."""
    summary = summary.sort_by([("file", "ascending"), ("pos", "ascending")])
    dropped: Counter = Counter()
    kept, clusters = _kept_after_dedup(summary, cfg, dropped)
    kept = pa.array(kept, pa.int64())
    difficulty = _difficulties(summary, kept, cfg, blocks)
    cols = summary.select(["id", "_block", "_row", "group", "redactions"]).take(kept).to_pylist()
    splits: dict[str, list[tuple]] = {"train": [], "heldout": []}
    for c, d in zip(cols, difficulty, strict=True):
        split = "heldout" if _in_heldout(c["id"], cfg) else "train"
        splits[split].append((d, c["id"], (c["_block"], c["_row"]), c["group"], c["redactions"]))
    result = Plan(
        documents_in=summary.num_rows,
        bytes_in=pc.sum(summary.column("n_bytes")).as_py() or 0,
        dropped=dropped,
        near_duplicate_clusters=clusters,
        shards={},
        difficulty={},
        redactions={},
        groups={},
    )
    for split, docs in splits.items():
        if not docs:
            continue
        if cfg.difficulty != "none":
            docs.sort(key=lambda d: (d[0], d[1]))  # ties by id: reproducible order
        n_shards = max(math.ceil(len(docs) / cfg.shard_docs), min(cfg.min_shards, len(docs)))
        parts = [
            docs[i * len(docs) // n_shards : (i + 1) * len(docs) // n_shards]
            for i in range(n_shards)
        ]
        result.shards[split] = [[d[2] for d in part] for part in parts]
        result.difficulty[split] = [[d[0] for d in part] for part in parts]
        result.redactions[split] = [
            sum((Counter(json.loads(d[4])) for d in part if d[4]), Counter()) for part in parts
        ]
        result.groups[split] = Counter(d[3] for d in docs if d[3] is not None)
    return result


# ---------------------------------------------------------------------------------------------
# write
# ---------------------------------------------------------------------------------------------


def write_shard(
    output: str,
    rel: str,
    rows: list[tuple[int, int]],
    difficulty: list,
    block_ids: list[int],
    *blocks: pa.Table,
) -> dict:
    """Gather a shard's rows from the blocks that hold them, write it; return its manifest entry."""
    by_block: dict[int, list[int]] = {}
    for b, r in rows:
        by_block.setdefault(b, []).append(r)
    parts, at, offset = [], {}, 0
    for b, block in zip(block_ids, blocks, strict=True):
        parts.append(block.take(by_block[b]))
        at.update({(b, r): offset + k for k, r in enumerate(by_block[b])})
        offset += len(by_block[b])
    table = pa.concat_tables(parts).take([at[(b, r)] for b, r in rows])
    table = table.select(["id", "text", "source", "n_chars", "group"]).add_column(
        4, "difficulty", pa.array(difficulty, pa.float32())
    )
    data = _shard_bytes(table.cast(SHARD_SCHEMA))
    storage.write_bytes(storage.join(output, rel), data)
    return {
        "path": rel,
        "sha256": hashlib.sha256(data).hexdigest(),
        "num_docs": table.num_rows,
        "num_chars": pc.sum(table.column("n_chars")).as_py() or 0,
        "num_bytes": len(data),
    }


def _shard_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=1024)
    return buf.getvalue()


def _write_shards(cfg: PrepareConfig, p: Plan, blocks: CuratedBlocks) -> dict[str, list[dict]]:
    calls, names = [], []
    for split, shards in p.shards.items():
        for i, rows in enumerate(shards):
            ids = sorted({b for b, _ in rows})
            rel = f"{split}/shard-{i:05d}.parquet"
            calls.append((ids, (cfg.output, rel, rows, p.difficulty[split][i], ids)))
            names.append((split, i))
    entries: dict[str, list[dict]] = {split: [] for split in p.shards}
    for (split, i), entry in zip(names, blocks.call(write_shard, calls), strict=True):
        counts = p.redactions[split][i]
        entries[split].append(entry | {"redactions": dict(sorted(counts.items()))})
    return entries


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------


def _use_ray(cfg: PrepareConfig, n_files: int) -> bool:
    if cfg.engine != "auto":
        return cfg.engine == "ray"
    import ray

    return ray.is_initialized() and n_files >= AUTO_RAY_MIN_FILES


def list_inputs(cfg: PrepareConfig) -> list[str]:
    """Every input file, listed once (one paginated LIST per S3 prefix, no per-object request)."""
    files: list[str] = []
    for uri in cfg.inputs:
        files.extend(storage.list_files(uri, INPUT_SUFFIXES))
    if not files:
        raise PrepareError(f"no .txt, .jsonl or .parquet files found under {cfg.inputs}")
    return files


def curate(files: list[str], cfg: PrepareConfig) -> CuratedBlocks:
    """Run the per-file curation with the configured engine."""
    if _use_ray(cfg, len(files)):
        return CuratedBlocks(_curate_with_ray(files, cfg), remote=True)
    return CuratedBlocks(_curate_locally(files, cfg), remote=False)


def _summarise(blocks: CuratedBlocks) -> pa.Table:
    """The small columns of every curated row, tagged with where the row lives."""
    parts = []
    for b, part in enumerate(blocks.map(_summary)):
        parts.append(
            part.append_column("_block", pa.array([b] * part.num_rows, pa.int32())).append_column(
                "_row", pa.array(range(part.num_rows), pa.int32())
            )
        )
    return pa.concat_tables(parts)


def _recipe_digest(cfg: PrepareConfig) -> str:
    """Hash of how the data was made, not of where it ran or was written: the same recipe on
    the same input gives the same shards whatever the engine, worker count or output location."""
    return config_digest(cfg.model_copy(update={"engine": "auto", "workers": None, "output": ""}))


def _manifest(cfg: PrepareConfig, files: list[str], p: Plan, shards: dict) -> dict:
    total = Counter()
    for split_counts in p.redactions.values():
        for c in split_counts:
            total.update(c)
    splits = {
        split: {
            "num_docs": sum(s["num_docs"] for s in entries),
            "groups": dict(sorted(p.groups[split].items())),
            "num_chars": sum(s["num_chars"] for s in entries),
            "redactions": dict(
                sorted(sum((Counter(s["redactions"]) for s in entries), Counter()).items())
            ),
            "shards": entries,
        }
        for split, entries in shards.items()
    }
    return {
        "version": MANIFEST_VERSION,
        "config_hash": _recipe_digest(cfg),
        "inputs": cfg.inputs,
        "files_read": len(files),
        "bytes_read": p.bytes_in,
        "documents_in": p.documents_in,
        "documents_out": sum(s["num_docs"] for s in splits.values()),
        "dropped": dict(sorted(p.dropped.items())),
        "redactions": dict(sorted(total.items())),
        "near_duplicate_clusters": p.near_duplicate_clusters,
        "difficulty": cfg.difficulty,
        "splits": splits,
    }


def prepare(cfg: PrepareConfig) -> dict:
    """Run the whole preparation and return the manifest that was written."""
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    manifest_uri = storage.join(cfg.output, MANIFEST)
    # Hide any earlier dataset at this location while its shards are being rewritten.
    storage.delete(manifest_uri)
    t0 = time.monotonic()
    files = list_inputs(cfg)
    blocks = curate(files, cfg)
    summary = _summarise(blocks)
    log.info(
        "curated %d files (%s engine) in %.1fs: %d documents, %.1f MB",
        len(files),
        "ray" if blocks.remote else "local",
        time.monotonic() - t0,
        summary.num_rows,
        (pc.sum(summary.column("n_bytes")).as_py() or 0) / 1e6,
    )
    p = plan(summary, cfg, blocks)
    if not p.shards.get("train"):
        raise PrepareError(
            f"no documents left to train on: read {p.documents_in} from {len(files)} files, "
            f"dropped {dict(p.dropped)}; check the inputs, the filters and heldout_fraction"
        )
    log.info("plan: dropped %s", dict(sorted(p.dropped.items())))
    manifest = _manifest(cfg, files, p, _write_shards(cfg, p, blocks))
    storage.write_bytes(manifest_uri, json.dumps(manifest, indent=2).encode())
    log.info(
        "wrote %s in %.1fs: %s",
        manifest_uri,
        time.monotonic() - t0,
        {k: v["num_docs"] for k, v in manifest["splits"].items()},
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
