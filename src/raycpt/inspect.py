"""`raycpt inspect`: what a checkpoint records — step, stage, config and code version, the
manifests it read, tokens per source, augmentation counters, data position, history."""

from __future__ import annotations

from collections import Counter

from raycpt import checkpoint as ckpt


def describe(location: str, documents: bool = False) -> dict:
    """A JSON-ready summary of a checkpoint (or a run folder's latest checkpoint)."""
    resolved = ckpt.resolve(location)
    folder = ckpt.fetch(resolved)
    meta = ckpt.read_meta(folder)
    states = ckpt.read_data_states(folder)
    counters: Counter = Counter()
    for st in states:
        for counts in st.get("counters", {}).values():
            counters.update(counts)
    out = {
        "checkpoint": resolved,
        "run": meta.get("run"),
        "stage": meta.get("stage"),
        "step": meta["step"],
        "config_hash": meta.get("config_hash"),
        "code_version": meta.get("code_version"),
        "world_size": meta.get("world_size"),
        "zero_stage": meta.get("zero_stage"),
        "precision": meta.get("precision"),
        "segments": meta.get("segments"),
        "manifests": meta.get("manifests"),
        "tokens_per_source": meta.get("tokens_per_source"),
        "counters": dict(sorted(counters.items())),
        "data_position": {
            f"rank{st['rank']}": {
                src: {"next_units": c["units"][:2], "tail": c["next_j"]}
                for src, c in st["cursors"].items()
            }
            for st in states
        },
        "last_metrics": (meta.get("history") or [None])[-1],
    }
    logged = [d for st in states for d in st.get("docs", [])]
    if logged:
        out["documents_logged"] = len(logged)
        if documents:
            out["documents"] = logged
    return out
