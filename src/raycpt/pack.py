"""Packing one source's documents into fixed-length token blocks, resumably.

Documents are joined end to end, each followed by EOS (and preceded by BOS where the tokenizer has
one), and cut into blocks of ``seq_len`` tokens. The stream's state is its :class:`Cursor`: which
unit and document come next and how many of that document's tokens were already emitted, so a
restart re-tokenizes at most one document and reads nothing it skipped.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from raycpt.stream import Cursor, SourceExhausted, Unit, UnitOrder, UnitReader


class SourceStream:
    """Fixed-length token blocks from one source, for one worker, in the global order."""

    def __init__(self, order: UnitOrder, reader: UnitReader, seq_len: int, cursor: Cursor):
        self.order = order
        self.reader = reader
        self.seq_len = seq_len
        self.cursor = cursor
        self._unit: Unit | None = None
        self.docs_started = 0
        self.tokens_emitted = 0
        self.consumed: list[tuple[str, int]] | None = None  # (doc id, epoch) when recording
        self.counts: Counter = Counter()  # data counters (augment/, group/) of units started

    def _ensure_unit(self) -> Unit:
        c = self.cursor
        if not c.units:
            if not self.order.exists(c.next_j):
                raise SourceExhausted(self.order.name)
            c.units.append([c.next_j, 0, 0])
            c.next_j += c.stride
        j, row, _ = c.units[0]
        if self._unit is None or self._unit.j != j:
            self.reader.prefetch(c.upcoming(self.order, self.reader.read_ahead + 1))
            self._unit = self.reader.get(j)
            if row == 0 and c.units[0][2] == 0:  # a unit started afresh (not a resumed one)
                self.counts.update(self._unit.counters)
            self.reader.prefetch(c.upcoming(self.order, self.reader.read_ahead + 1)[1:])
        if row >= len(self._unit.tokens):  # unit finished: move on to the next one
            c.units.pop(0)
            self._unit = None
            return self._ensure_unit()
        return self._unit

    def next_block(self) -> np.ndarray:
        """Return the next ``seq_len`` tokens (int64). Raises SourceExhausted at the end."""
        parts = []
        need = self.seq_len
        c = self.cursor
        while need:
            unit = self._ensure_unit()
            pos = c.units[0]  # [j, row, tok_off]
            doc = unit.tokens[pos[1]]
            if pos[2] == 0:
                self.docs_started += 1
                if self.consumed is not None:
                    self.consumed.append((unit.ids[pos[1]], unit.epoch))
            take = min(need, len(doc) - pos[2])
            parts.append(doc[pos[2] : pos[2] + take])
            pos[2] += take
            need -= take
            if pos[2] >= len(doc):
                pos[1] += 1
                pos[2] = 0
        self.tokens_emitted += self.seq_len
        return np.concatenate(parts).astype(np.int64, copy=False)


def make_encoder(tokenizer):
    """A batch encoder: texts -> token arrays with BOS (if any) and EOS around each document.

    Uses the Rust tokenizer directly: its batch call runs outside the GIL, so tokenizing in the
    reader thread overlaps with the training step.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: documents could not be separated")
    bos = tokenizer.bos_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)

    def encode(texts: list[str]) -> list[np.ndarray]:
        if backend is not None:
            ids = (e.ids for e in backend.encode_batch(texts, add_special_tokens=False))
        else:
            ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
        head = [bos] if bos is not None and bos != eos else []
        # one document's Python list at a time: a shard's worth would be ~8x its int32 array
        return [np.asarray(head + x + [eos], dtype=np.int32) for x in ids]

    return encode
