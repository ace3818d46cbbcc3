"""The training data loader of one worker: sources -> streams -> mixer -> micro-batches.

It owns one :class:`SourceStream` per source and the global :class:`SlotMixer`, prepares the micro-
batches of the next optimizer steps in a background thread (``prefetch_batches`` ahead), and keeps,
with every step it hands out, the exact data state after that step. That state is what a
checkpoint stores: restoring it continues with the very next token, on the same or on a different
number of workers.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycpt.config import DataConfig
from raycpt.mix import MixSchedule, SlotMixer
from raycpt.pack import SourceStream, make_encoder
from raycpt.prepare import PrepareError, load_manifest
from raycpt.stream import Cursor, SourceExhausted, Transform, UnitOrder, UnitReader, repartition

log = logging.getLogger(__name__)


@dataclass
class Layout:
    """How a global batch of ``G`` slots is laid out over workers and micro-batches."""

    rank: int
    world: int
    micro_batch: int
    grad_accum: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    def my_slots(self, m: int) -> range:
        """Offsets, within the step's slots, of this worker's micro-batch ``m``."""
        start = (m * self.world + self.rank) * self.micro_batch
        return range(start, start + self.micro_batch)


@dataclass
class StepData:
    """The micro-batches of one optimizer step and the loader state right after it."""

    micro_batches: list[np.ndarray]
    state: dict
    docs: list = field(default_factory=list)  # (doc id, epoch) started in this step, if logged


class DataExhausted(Exception):
    """A source configured with on_exhausted: stop ran out."""


def build_orders(cfg: DataConfig, seed: int) -> tuple[list[UnitOrder], list[dict]]:
    """The global unit order and split manifest of every source."""
    orders, splits = [], []
    for src in cfg.sources:
        manifest = load_manifest(src.path)
        split = manifest["splits"].get(src.split)
        if split is None:
            raise PrepareError(
                f"data.sources[{src.name}]: {src.path} has no split {src.split!r} "
                f"(it has {sorted(manifest['splits'])})"
            )
        rows = tuple(s["num_docs"] for s in split["shards"])
        epochs = 1 if cfg.on_exhausted == "stop" else None
        curriculum = None
        if cfg.curriculum.enabled:
            if manifest.get("difficulty", "none") == "none":
                raise PrepareError(
                    f"data.curriculum.enabled: source {src.name!r} ({src.path}) was prepared "
                    "without a difficulty score; run prepare with difficulty: length|rarity|field"
                )
            curriculum = cfg.curriculum.randomness
        orders.append(UnitOrder(src.name, rows, seed, cfg.shuffle, epochs, curriculum))
        splits.append(split)
    return orders, splits


class CPTDataLoader:
    """Micro-batches for one worker, deterministic and resumable."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer,
        seed: int,
        layout: Layout,
        total_steps: int,
        resume: list[dict] | None = None,
        transform: Transform | None = None,
        record_documents: bool = False,
    ):
        self.cfg = cfg
        self.layout = layout
        self.names = [s.name for s in cfg.sources]
        orders, splits = build_orders(cfg, seed)
        encode = make_encoder(tokenizer)
        self.mixer = SlotMixer(MixSchedule(cfg.sources), total_steps * layout.global_batch)
        cursors = {n: Cursor.fresh(layout.rank, layout.world) for n in self.names}
        self.step = 0
        self._counts_restore: list[dict] = [{} for _ in self.names]
        self._docs_restore: list = []
        if resume:
            cursors = self._restore(resume)
        self.streams = []
        for i, (src, order, split) in enumerate(zip(cfg.sources, orders, splits, strict=True)):
            reader = UnitReader(
                src.path,
                split,
                order,
                encode,
                cfg.read_ahead,
                transform,
                group_weights=src.group_weights,
            )
            if transform is not None:
                reader.progress = self._unit_progress(i, reader, encode)
            self.streams.append(SourceStream(order, reader, cfg.seq_len, cursors[src.name]))
        for stream, counts in zip(self.streams, self._counts_restore, strict=True):
            stream.counts.update(counts)
        self.record = record_documents or cfg.log_documents
        if self.record:  # (doc id, epoch) of every document started, for audits and tests
            for stream in self.streams:
                stream.consumed = []
        # Documents of the steps handed out so far (this worker; all old workers' on worker 0
        # after a re-partition), kept when data.log_documents is on.
        self.doc_log: list = list(self._docs_restore) if cfg.log_documents else []
        self.wait_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.prefetch_batches)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="cpt-loader", daemon=True)
        self._thread.start()

    def _restore(self, states: list[dict]) -> dict[str, Cursor]:
        """Load this worker's cursors from every old worker's state, re-partitioning if needed."""
        states = sorted(states, key=lambda s: s["rank"])
        old_world = states[0]["world"]
        if len(states) != old_world:
            raise ValueError(f"checkpoint holds {len(states)} data states for {old_world} workers")
        self.mixer.load_state_dict(states[0]["mixer"])
        self.step = states[0]["step"]
        out = {}
        for name in self.names:
            old = [
                Cursor.from_dict(s["cursors"][name])
                if name in s["cursors"]
                else Cursor.fresh(s["rank"], old_world)
                for s in states
            ]
            out[name] = repartition(old, self.layout.world)[self.layout.rank]
        if old_world == self.layout.world:
            own = states[self.layout.rank]
            self._counts_restore = [own.get("counters", {}).get(n, {}) for n in self.names]
            self._docs_restore = own.get("docs", [])
        else:
            log.info("data re-partitioned from %d to %d workers", old_world, self.layout.world)
            if self.layout.rank == 0:  # keep the run's totals: all old counters go to rank 0
                self._docs_restore = [d for st in states for d in st.get("docs", [])]
                self._counts_restore = [
                    dict(
                        sum((Counter(s.get("counters", {}).get(n, {})) for s in states), Counter())
                    )
                    for n in self.names
                ]
        return out

    def _unit_progress(self, index: int, reader: UnitReader, encode) -> Callable[[int], float]:
        """Unit id -> fraction of the run at which that unit is expected to be trained on.

        Deterministic (config, manifest and tokenizer only; never timing), so augmentation
        schedules give the same text after a restart on any number of workers: the source's
        expected share of the run's tokens, over the tokens of an average unit (measured by
        tokenizing the first documents of shard 0).
        """
        grid = np.linspace(0.0, 1.0, 101)
        share = float(np.mean([self.mixer.schedule.weights(p)[index] for p in grid]))
        run_tokens = share * self.mixer.total_slots * self.cfg.seq_len
        sample = pq.read_table(pa.BufferReader(reader.fetch(0)), columns=["text"])
        texts = sample.column("text").to_pylist()[:20]
        chars_per_token = sum(map(len, texts)) / max(1, sum(len(t) for t in encode(texts)))
        unit_tokens = reader.num_chars / reader.order.num_shards / chars_per_token
        return lambda j: min(1.0, j * unit_tokens / max(run_tokens, 1.0))

    def _state(self) -> dict:
        return {
            "rank": self.layout.rank,
            "world": self.layout.world,
            "step": self.step,
            "mixer": self.mixer.state_dict(),
            "cursors": {
                n: s.cursor.to_dict() for n, s in zip(self.names, self.streams, strict=False)
            },
            "tokens_per_source": self.tokens_per_source(),
            "counters": {n: dict(s.counts) for n, s in zip(self.names, self.streams, strict=True)},
        }

    def counters(self) -> dict[str, int]:
        """This worker's data counters summed over sources: augment/<transform>/docs|edits and
        group/<group>/docs (documents served per sub-population after weighting)."""
        total: Counter = Counter()
        for s in self.streams:
            total.update(s.counts)
        return dict(total)

    def tokens_per_source(self) -> dict[str, int]:
        """Tokens consumed so far per source, over all workers."""
        return {
            n: int(c) * self.cfg.seq_len for n, c in zip(self.names, self.mixer.count, strict=False)
        }

    def _produce(self) -> None:
        lay = self.layout
        try:
            while not self._stop.is_set():
                sources = self.mixer.take(lay.global_batch)
                micro = []
                for m in range(lay.grad_accum):
                    blocks = [self.streams[sources[i]].next_block() for i in lay.my_slots(m)]
                    micro.append(np.stack(blocks))
                self.step += 1
                docs = []
                if self.record:
                    for stream in self.streams:
                        docs += stream.consumed
                        stream.consumed = [] if self.cfg.log_documents else stream.consumed
                self._put(StepData(micro, self._state(), docs if self.cfg.log_documents else []))
        except SourceExhausted as err:
            self._put(DataExhausted(f"source {err.source!r} has no more data"))
        except BaseException as err:  # handed to the training loop, which re-raises it
            self._put(err)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def next_step(self) -> StepData:
        """The next step's micro-batches; raises DataExhausted or any reader error."""
        t0 = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        self.doc_log.extend(item.docs)
        return item

    def close(self) -> None:
        self._stop.set()
        for s in self.streams:
            s.reader.close()
