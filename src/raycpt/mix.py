"""Mixing sources by token share, deterministically, over every window of the run.

Every packed block has the same length, so token shares are block shares. The global stream of
blocks is numbered by *slot*; the optimizer step ``k`` consumes slots ``[k*G, (k+1)*G)`` for a
global batch of ``G`` sequences, whatever the number of workers. :class:`SlotMixer` assigns each
slot a source by a smooth weighted round-robin (the largest deficit between a source's cumulative
target and what it has received wins), as Megatron's blended datasets do. The error of every
prefix is below one block per source, so the share over any window of ``n`` blocks is within
``2/n`` of its target. Weights may follow a piecewise-linear schedule over the run.
"""

from __future__ import annotations

import numpy as np

from raycpt.config import SourceConfig


class MixSchedule:
    """Normalised source weights as a function of run progress in [0, 1]."""

    def __init__(self, sources: list[SourceConfig]):
        self.names = [s.name for s in sources]
        self._points = []
        for s in sources:
            if s.schedule:
                self._points.append(([p.at for p in s.schedule], [p.weight for p in s.schedule]))
            else:
                self._points.append(([0.0], [s.weight]))

    def weights(self, progress: float) -> np.ndarray:
        w = np.array([np.interp(progress, at, ws) for at, ws in self._points], dtype=np.float64)
        total = w.sum()
        if total <= 0:
            raise ValueError(f"all source weights are 0 at progress {progress:.3f}")
        return w / total


class SlotMixer:
    """Assigns a source to every global slot; its state is the same on every worker."""

    def __init__(self, schedule: MixSchedule, total_slots: int):
        self.schedule = schedule
        self.total_slots = max(total_slots, 1)
        n = len(schedule.names)
        self.slot = 0
        self.target = np.zeros(n)
        self.count = np.zeros(n, dtype=np.int64)

    def take(self, n: int) -> list[int]:
        """Assign the next ``n`` slots; return their source indices."""
        out = []
        for _ in range(n):
            self.target += self.schedule.weights(min(self.slot / self.total_slots, 1.0))
            s = int(np.argmax(self.target - self.count))
            self.count[s] += 1
            self.slot += 1
            out.append(s)
        return out

    def state_dict(self) -> dict:
        return {"slot": self.slot, "target": self.target.tolist(), "count": self.count.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.slot = state["slot"]
        self.target = np.asarray(state["target"], dtype=np.float64)
        self.count = np.asarray(state["count"], dtype=np.int64)
