"""Checkpoints: DeepSpeed's sharded state + the exact data state + metadata, as one Ray Train
checkpoint.

Every worker writes its own part into a local folder and reports it; Ray Train uploads each part
to ``<storage_path>/<name>/checkpoint_<step>/`` and registers the checkpoint only when every worker
has reported, so an interrupted save is never what a resume picks up. Layout::

    ds/...                 DeepSpeed (model states, one optimizer shard per worker), tag "ds"
    data/rank-00000.json   the data loader state of each worker after this step
    raycpt.json            metadata (step, config and hash, manifests, tokens per source), rank 0
    hf/                    model config + tokenizer, so export needs nothing else (rank 0)
    probe.pt               the engine's logits on a fixed probe batch (final checkpoint only)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from raycpt import __version__, storage

log = logging.getLogger(__name__)

DS_TAG = "ds"
META = "raycpt.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints
PROBE = "probe.pt"
_STEP_DIR = re.compile(r"checkpoint_(\d+)$")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for; the message says where it looked."""


def code_version() -> str:
    """The package version plus the git commit when running from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def write_local(
    engine,
    step: int,
    rank: int,
    data_state: dict,
    meta: dict | None,
    hf_objects: tuple | None = None,
) -> str:
    """Write this worker's part of a checkpoint into a new local folder and return its path.

    DeepSpeed's save is collective: every worker must call this at the same step. The zip
    CRC32s are not computed: torch.load never checks them (PyTorch's zip reader skips the
    check; a flipped byte loads silently either way), and computing them doubles torch.save's
    CPU time per byte (BENCHMARKS.md, "Checkpoint cost").
    """
    from torch.utils.serialization import config as torch_serialization

    folder = tempfile.mkdtemp(prefix=f"raycpt-{dir_name(step)}-")
    with torch_serialization.patch("save.compute_crc32", False):  # thread-local, this save only
        engine.save_checkpoint(folder, tag=DS_TAG, client_state={"step": step})
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    with open(os.path.join(folder, "data", f"rank-{rank:05d}.json"), "w") as f:
        json.dump(data_state, f)
    if rank == 0:
        if hf_objects is not None:
            for obj in hf_objects:
                obj.save_pretrained(os.path.join(folder, "hf"))
        with open(os.path.join(folder, META), "w") as f:
            json.dump({**(meta or {}), "step": step, "saved_at": time.time()}, f, indent=2)
    return folder


def read_data_states(folder: str) -> list[dict]:
    data = os.path.join(folder, "data")
    return [json.load(open(os.path.join(data, n))) for n in sorted(os.listdir(data))]


def read_meta(folder: str) -> dict:
    with open(os.path.join(folder, META)) as f:
        return json.load(f)


def list_checkpoints(run: str) -> list[tuple[int, str]]:
    """(step, location) of every complete checkpoint of a run, oldest first.

    Ray Train registers a checkpoint in its snapshot file only once every worker's part is
    uploaded; a folder that a crash during a save left behind is not in it and is ignored here,
    as Ray's own resume ignores it (the next save of that step replaces it).
    """
    found = step_folders(run)
    registered = registered_checkpoints(run)
    if registered is None:  # not written by Ray Train (or by a Ray without the snapshot)
        return found
    partial = [loc for _, loc in found if os.path.basename(loc) not in registered]
    if partial:
        log.warning("ignoring checkpoint folders Ray Train never registered (partial): %s", partial)
    return [(step, loc) for step, loc in found if os.path.basename(loc) in registered]


def remove_partial(run: str, after_step: int) -> list[str]:
    """Delete the checkpoint folders past `after_step` that Ray Train never registered: the
    leftovers of a save cut short, by a crash or a lost node, before a group restarted from
    `after_step`. Its next save of such a step writes into a clean folder: with another worker
    count the old attempt's extra files (its other ranks' shards and data states) would
    otherwise mix with the new ones. Returns the folders removed."""
    registered = registered_checkpoints(run)
    if registered is None:
        return []
    stale = [
        loc
        for step, loc in step_folders(run)
        if step > after_step and os.path.basename(loc) not in registered
    ]
    for loc in stale:
        storage.remove_dir(loc)
    if stale:
        log.warning("removed checkpoint folders of a save that never completed: %s", stale)
    return stale


def registered_checkpoints(run: str) -> set[str] | None:
    """The checkpoint folder names in Ray Train's checkpoint-manager snapshot of a run."""
    snapshot = storage.join(run, RAY_SNAPSHOT)
    if not storage.exists(snapshot):
        return None
    state = json.loads(storage.read_bytes(snapshot))
    results = state.get("checkpoint_results", [])
    return {r["checkpoint_dir_name"] for r in results}


def step_folders(run: str) -> list[tuple[int, str]]:
    """(step, location) of every checkpoint_<step> folder of a run, complete or not."""
    fs, path = storage.filesystem(run)
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as err:
        raise CheckpointError(f"cannot list {run}: {err}") from None
    found = []
    for info in infos:
        m = _STEP_DIR.search(info.path)
        if m and info.type == pafs.FileType.Directory:
            found.append((int(m.group(1)), storage.join(run, os.path.basename(info.path))))
    return sorted(found)


def fetch(checkpoint: str) -> str:
    """A local folder with the checkpoint's files (downloaded if it is on S3)."""
    if not storage.is_remote(checkpoint):
        return storage.filesystem(checkpoint)[1]
    dest = tempfile.mkdtemp(prefix="raycpt-fetch-")
    return storage.download_dir(checkpoint, dest)


def _complete(loc: str) -> bool:
    return storage.exists(storage.join(loc, META)) and storage.exists(storage.join(loc, "latest"))


def resolve(run_or_checkpoint: str, best: bool = False) -> str:
    """A complete checkpoint location from a run folder (its latest, or with ``best`` the one
    with the best ``checkpoint.score_metric``) or from a checkpoint folder."""
    if _STEP_DIR.search(run_or_checkpoint.rstrip("/")):
        candidates = [run_or_checkpoint]
    else:
        candidates = [loc for _, loc in reversed(list_checkpoints(run_or_checkpoint))]
    complete = [loc for loc in candidates if _complete(loc)]
    if complete and best:
        return _best(run_or_checkpoint, complete)
    if complete:
        return complete[0]
    raise CheckpointError(
        f"no complete checkpoint under {run_or_checkpoint}: pass a run folder "
        "(<storage_path>/<name>) or one of its checkpoint_<step> folders"
    )


def _best(run: str, locations: list[str]) -> str:
    metas = {loc: json.loads(storage.read_bytes(storage.join(loc, META))) for loc in locations}
    scored = {loc: m["score"] for loc, m in metas.items() if m.get("score") is not None}
    if not scored:
        raise CheckpointError(
            f"no checkpoint under {run} has a score: set checkpoint.score_metric (and eval.sets) "
            "in the run config to rank checkpoints"
        )
    order = metas[next(iter(scored))]["config"]["checkpoint"]["score_order"]
    pick = min if order == "min" else max
    return pick(scored, key=scored.get)


def folder_bytes(folder: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
    )


def remove_local(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
