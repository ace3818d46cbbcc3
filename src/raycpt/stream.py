"""Streaming a prepared dataset's shards to one training worker, in a fixed global order.

Three concerns, kept apart (as mosaicml/streaming does):

* **Order** (:class:`UnitOrder`, pure): a source is an endless sequence of *units*, unit ``j`` being
  one shard in one epoch. Each epoch visits every shard once, in a seeded permutation, and the rows
  of a unit in another seeded permutation. The order depends on the manifest and the seed only.
* **Partition** (:func:`repartition`, pure): worker ``r`` of ``W`` owns units ``r, r+W, r+2W, ...``
  plus any explicitly queued units. Because the order is global, a different worker count can take
  over exactly the units (and the half-read unit) that the old workers had not consumed.
* **Reading** (:class:`UnitReader`): fetches a unit's shard (local or S3), checks its sha256 against
  the manifest, applies the transform (augmentation) and tokenizes, in background threads, with at
  most ``read_ahead`` units in memory. Training starts as soon as the first unit is ready.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycpt import storage

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard is missing, unreadable or does not match its manifest entry."""


class SourceExhausted(Exception):
    """A source configured to stop after one epoch has no more units for this worker."""

    def __init__(self, source: str):
        super().__init__(f"source {source!r} is exhausted")
        self.source = source


def _seeded_rng(*key: object) -> np.random.Generator:
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class UnitOrder:
    """The global order of one source: unit ``j`` -> (epoch, shard) and its row permutation.

    ``num_epochs`` is None for an endless source (repeat) or 1 for a source that stops.
    """

    name: str
    shard_rows: tuple[int, ...]
    seed: int
    shuffle: bool = True
    num_epochs: int | None = None
    curriculum: float | None = None  # randomness of an easy-to-hard order, or None

    def _permutation(self, n: int, *key: object) -> np.ndarray:
        rng = _seeded_rng(self.seed, self.name, *key)
        if self.curriculum is not None:
            # shards and rows were written easiest first: keep that order, perturbed by up
            # to `curriculum` x n positions
            return np.argsort(np.arange(n) + rng.uniform(0, self.curriculum * n, n), kind="stable")
        if not self.shuffle:
            return np.arange(n)
        return rng.permutation(n)

    @property
    def num_shards(self) -> int:
        return len(self.shard_rows)

    def exists(self, j: int) -> bool:
        return self.num_epochs is None or j < self.num_epochs * self.num_shards

    def unit(self, j: int) -> tuple[int, int]:
        """Return (epoch, shard index) of unit ``j``."""
        epoch, k = divmod(j, self.num_shards)
        return epoch, int(self._permutation(self.num_shards, "shards", epoch)[k])

    def rows(self, j: int) -> np.ndarray:
        """Row indices of unit ``j``'s shard in the order they are trained on."""
        epoch, shard = self.unit(j)
        return self._permutation(self.shard_rows[shard], "rows", epoch, shard)


@dataclass
class Cursor:
    """Where one worker stands in one source.

    ``units`` holds ``[j, row, tok_off]`` entries: the unit being read first, then units queued by
    a re-partition. ``row`` is the position, in the unit's row order, of its current document and
    ``tok_off`` how many of that document's tokens were already emitted. After the queue the
    worker continues with units ``next_j, next_j + stride, ...``.
    """

    units: list[list[int]]
    next_j: int
    stride: int

    @classmethod
    def fresh(cls, rank: int, world: int) -> Cursor:
        return cls(units=[], next_j=rank, stride=world)

    def to_dict(self) -> dict:
        return {
            "units": [list(u) for u in self.units],
            "next_j": self.next_j,
            "stride": self.stride,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Cursor:
        return cls([list(u) for u in d["units"]], d["next_j"], d["stride"])

    def upcoming(self, order: UnitOrder, count: int) -> list[int]:
        """The next ``count`` unit ids this worker will read (fewer if the source ends)."""
        out = [u[0] for u in self.units[:count]]
        j = self.next_j
        while len(out) < count and order.exists(j):
            out.append(j)
            j += self.stride
        return out


def repartition(cursors: Sequence[Cursor], new_world: int) -> list[Cursor]:
    """Hand the units that ``cursors`` (one per old worker) had not finished to ``new_world``
    workers; return one cursor per new worker.

    Every unit is owned by exactly one new worker: half-read units keep their row and token
    position; untouched units below the old workers' furthest point are queued; everything
    beyond continues strided by the new world size. Pure function.
    """
    if len(cursors) == new_world and all(c.stride == new_world for c in cursors):
        return [Cursor.from_dict(c.to_dict()) for c in cursors]
    frontier = max(c.next_j for c in cursors)
    leftovers = [list(u) for c in cursors for u in c.units]
    for c in cursors:
        leftovers.extend([j, 0, 0] for j in range(c.next_j, frontier, c.stride))
    leftovers.sort()
    new = [Cursor([], frontier + r, new_world) for r in range(new_world)]
    for i, u in enumerate(leftovers):
        new[i % new_world].units.append(u)
    return new


@dataclass
class Unit:
    """One shard in one epoch, ready to train on: token arrays in training order."""

    j: int
    epoch: int
    shard: int
    ids: list[str]
    tokens: list[np.ndarray]
    counters: dict = field(default_factory=dict)  # augmentation counters of this unit


Transform = Callable[[list[str], list[str], int, float], tuple[list[str], dict]]
"""(texts, doc ids, epoch, run progress) -> (transformed texts, counters); deterministic."""


class UnitReader:
    """Reads, verifies, transforms and tokenizes units ahead of use, ``read_ahead`` at most."""

    def __init__(
        self,
        dataset: str,
        split_manifest: dict,
        order: UnitOrder,
        encode: Callable[[list[str]], list[np.ndarray]],
        read_ahead: int = 2,
        transform: Transform | None = None,
        progress: Callable[[int], float] = lambda j: 0.0,
        group_weights: dict[str, float] | None = None,
    ):
        self.dataset = dataset
        self.shards = split_manifest["shards"]
        self.num_chars = split_manifest["num_chars"]
        self.order = order
        self.encode = encode
        self.read_ahead = read_ahead
        self.transform = transform
        self.progress = progress  # unit id -> fraction of the run, for augmentation schedules
        self.group_weights = group_weights or {}
        # Two stages so that downloads overlap decoding: up to read_ahead shard downloads run
        # at once (I/O-bound), while one thread verifies, decodes and tokenizes in order.
        self._io = ThreadPoolExecutor(
            max_workers=read_ahead, thread_name_prefix=f"get-{order.name}"
        )
        self._cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tok-{order.name}")
        self._futures: OrderedDict[int, Future] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes_read = 0

    def prefetch(self, js: list[int]) -> None:
        """Start loading these units (the next ones needed), keeping at most read_ahead."""
        with self._lock:
            for j in js:
                if len(self._futures) >= self.read_ahead:
                    break
                if j not in self._futures:
                    data = self._io.submit(self.fetch, self.order.unit(j)[1])
                    self._futures[j] = self._cpu.submit(self._load, j, data)

    def get(self, j: int) -> Unit:
        with self._lock:
            fut = self._futures.pop(j, None)
        if fut is None:
            return self._load(j)
        return fut.result()

    def close(self) -> None:
        self._io.shutdown(wait=False, cancel_futures=True)
        self._cpu.shutdown(wait=False, cancel_futures=True)

    def fetch(self, shard: int) -> bytes:
        """A shard's bytes, checked against the manifest's sha256."""
        entry = self.shards[shard]
        uri = storage.join(self.dataset, entry["path"])
        try:
            data = storage.read_bytes(uri)
        except storage.StorageError as err:
            raise ShardError(
                f"shard {entry['path']} of {self.dataset} cannot be read: {err}"
            ) from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise ShardError(
                f"shard {uri} does not match its manifest (sha256 {digest[:12]}..., expected "
                f"{entry['sha256'][:12]}...): it was altered or truncated; re-run prepare"
            )
        self.bytes_read += len(data)
        return data

    def _weigh_groups(self, table: pa.Table, rows: np.ndarray, ids: list[str], epoch: int):
        """Repeat or drop documents by their group's weight w: floor(w) copies plus one more
        with probability frac(w), drawn per (seed, document, epoch). Copies after the first get
        ids '<id>#<k>' (so augmentation varies them); they stay next to each other."""
        groups = table.column("group").take(rows).to_pylist()
        keep_rows, keep_ids, counts = [], [], {}
        for row, did, group in zip(rows.tolist(), ids, groups, strict=True):
            w = self.group_weights.get(group, 1.0) if group is not None else 1.0
            u = _seeded_rng(self.order.seed, self.order.name, "group", epoch, did).random()
            copies = int(w) + (u < w - int(w))
            keep_rows += [row] * copies
            keep_ids += [did if k == 0 else f"{did}#{k}" for k in range(copies)]
            key = f"group/{group}/docs"
            counts[key] = counts.get(key, 0) + copies
        return np.asarray(keep_rows, dtype=np.int64), keep_ids, counts

    def _load(self, j: int, data: Future | None = None) -> Unit:
        epoch, shard = self.order.unit(j)
        raw = data.result() if data is not None else self.fetch(shard)
        columns = ["id", "text"] + (["group"] if self.group_weights else [])
        table = pq.read_table(pa.BufferReader(raw), columns=columns)
        rows = self.order.rows(j)
        ids = table.column("id").take(rows).to_pylist()
        counters: dict = {}
        if self.group_weights:
            rows, ids, counters = self._weigh_groups(table, rows, ids, epoch)
        texts = table.column("text").take(rows).to_pylist()
        if self.transform is not None:
            texts, counts = self.transform(texts, ids, epoch, self.progress(j))
            counters.update({f"augment/{k}": v for k, v in counts.items()})
        return Unit(j, epoch, shard, ids, self.encode(texts), counters)
