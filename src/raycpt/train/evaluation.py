"""Periodic held-out evaluation inside the Ray Train loop, and the early-stopping decision.

Every worker evaluates every world-th block of each set and the sums are all-reduced, so the
result equals a single-process evaluation of the whole set. The first evaluation of a run (step
0, the base model) is the reference for gain (domain perplexity falls) and forgetting (general
perplexity rises); it is kept in checkpoints so a resumed run compares against the same numbers.
"""

from __future__ import annotations

import logging

import torch

from raycpt.config import EarlyStopConfig, EvalConfig
from raycpt.evaluate import EvalResult, evaluate_set, load_set

log = logging.getLogger(__name__)
PREFIX = "eval/"


class Evaluator:
    """The run's evaluation sets, loaded once per worker, and their evaluation."""

    def __init__(self, cfg: EvalConfig, tokenizer, seq_len: int, micro_batch: int, rank, world):
        self.cfg = cfg
        self.rank, self.world = rank, world
        self.batch_size = cfg.batch_size or micro_batch
        self.sets = [
            (s, load_set(s.name, s.path, s.split, tokenizer, seq_len, s.max_tokens))
            for s in cfg.sets
        ]
        self.base: dict[str, float] | None = None  # metrics of the first evaluation

    def __bool__(self) -> bool:
        return bool(self.sets)

    def due(self, step: int, last: bool) -> bool:
        every = self.cfg.every_steps
        return bool(self.sets) and (last or (every > 0 and step % every == 0))

    def evaluate(self, engine, device: torch.device, sum_over_workers) -> dict[str, float]:
        """Evaluate every set (collective: all workers call it at the same step)."""
        engine.eval()
        bins = self.cfg.calibration_bins
        local = [
            evaluate_set(
                lambda x: engine(input_ids=x).logits,
                data,
                self.batch_size,
                device,
                bins,
                self.rank,
                self.world,
            )
            for _, data in self.sets
        ]
        flat = sum_over_workers([v for r in local for v in r.to_vector()])
        width = len(flat) // len(local)
        results = [
            EvalResult.from_vector(flat[i * width : (i + 1) * width]) for i in range(len(local))
        ]
        metrics: dict[str, float] = {}
        by_role: dict[str, EvalResult] = {}
        for (spec, _), r in zip(self.sets, results, strict=True):
            metrics.update({f"{PREFIX}set/{spec.name}/{k}": v for k, v in r.metrics().items()})
            by_role[spec.role] = by_role[spec.role] + r if spec.role in by_role else r
        for role, r in by_role.items():
            metrics.update({f"{PREFIX}{role}/{k}": v for k, v in r.metrics().items()})
        if self.base is None:
            self.base = dict(metrics)
        for role in by_role:
            key = f"{PREFIX}{role}/ppl"
            metrics[f"{PREFIX}{role}/ppl_vs_base"] = metrics[key] / self.base[key]
        return metrics


def stop_reason(evals: list[dict], cfg: EarlyStopConfig) -> str | None:
    """Why the run should stop after the last of ``evals`` (every evaluation so far, oldest
    first), or None. A pure function of the history, so a resumed run decides the same."""
    if not evals:
        return None
    last = evals[-1]
    rise = last.get(f"{PREFIX}general/ppl_vs_base")
    if cfg.forgetting_budget is not None and rise is not None and rise - 1 > cfg.forgetting_budget:
        return (
            f"forgetting budget exceeded: general perplexity is {rise - 1:+.1%} vs the base "
            f"model (budget {cfg.forgetting_budget:.1%})"
        )
    if not cfg.patience:
        return None
    if cfg.metric not in last:
        raise KeyError(
            f"eval.early_stop.metric {cfg.metric!r} is not an evaluation metric; "
            f"available: {sorted(k for k in last if k.startswith(PREFIX))}"
        )
    best, since = None, 0
    for e in evals:
        value = e[cfg.metric]
        if best is None or _improves(value, best, cfg):
            best, since = value, 0
        else:
            since += 1
    if since >= cfg.patience:
        return (
            f"plateau: {cfg.metric} has not improved by {cfg.min_delta:.1%} on its best "
            f"({best:.4g}) for {since} evaluations (patience {cfg.patience})"
        )
    return None


def _improves(value: float, best: float, cfg: EarlyStopConfig) -> bool:
    if cfg.mode == "min":
        return value < best - abs(best) * cfg.min_delta
    return value > best + abs(best) * cfg.min_delta


def eval_history(history: list[dict]) -> list[dict]:
    """The evaluations among a run's reported metrics windows."""
    return [h for h in history if any(k.startswith(PREFIX) for k in h)]
