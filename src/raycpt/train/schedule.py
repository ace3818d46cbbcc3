"""Learning-rate schedules for continued pretraining, as multipliers of the peak LR.

* ``rewarm_cosine`` (default): linear re-warm from 0 over ``warmup_steps``, then cosine re-decay to
  ``min_lr_ratio`` at the horizon, the recipe of Gupta et al. 2023 / Ibrahim et al. 2024.
* ``wsd``: warm-up, a constant plateau, then a linear decay over the last ``decay_fraction``.
* ``constant``: the base model's final LR (set ``train.lr`` to it), no warm-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from raycpt.config import ScheduleConfig


def lr_multiplier(cfg: ScheduleConfig, horizon: int) -> Callable[[int], float]:
    """Return f(step) -> factor applied to the peak LR; step counts optimizer steps from 0."""
    floor, warm = cfg.min_lr_ratio, cfg.warmup_steps

    def warmup(step: int) -> float | None:
        return (step + 1) / warm if step < warm else None

    if cfg.name == "constant":
        return lambda step: 1.0

    if cfg.name == "rewarm_cosine":

        def f(step: int) -> float:
            w = warmup(step)
            if w is not None:
                return w
            t = min(1.0, (step - warm) / max(1, horizon - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

        return f

    decay_start = horizon - max(1, round(cfg.decay_fraction * horizon))

    def wsd(step: int) -> float:
        w = warmup(step)
        if w is not None:
            return w
        if step < decay_start:
            return 1.0
        t = min(1.0, (step - decay_start) / max(1, horizon - decay_start))
        return 1.0 - (1.0 - floor) * t

    return wsd
