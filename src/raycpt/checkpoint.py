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
    parts/rank-00000.json  each worker's files and their sizes, uploaded after them

A folder is complete when every worker's ``parts`` file is there and every file it lists has its
size: a check that needs neither Ray's snapshot (`resolve` on a checkpoint folder, a run folder
copied elsewhere) nor trust in the order a crashed upload stopped in.
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
# Written by Ray Train into a run folder when the run starts, and checked before every checkpoint
# upload (ray.train.v2 StorageContext): a run folder that has it is Ray Train's.
RAY_MARKER = ".validate_storage_marker"
PARTS = "parts"
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


def seal_local(folder: str, rank: int) -> str:
    """Record this worker's files and their sizes in ``parts/rank-<rank>.json`` (the last file
    added to its local folder) and return that file's path relative to the folder, for
    `storage.upload_dir(..., last=...)` to upload after every other file of the part."""
    files = {
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"): os.path.getsize(
            os.path.join(root, name)
        )
        for root, _, names in os.walk(folder)
        for name in names
    }
    rel = f"{PARTS}/rank-{rank:05d}.json"
    os.makedirs(os.path.join(folder, PARTS), exist_ok=True)
    with open(os.path.join(folder, rel), "w") as f:
        json.dump({"rank": rank, "files": files}, f)
    return rel


def read_data_states(folder: str) -> list[dict]:
    data = os.path.join(folder, "data")
    return [json.load(open(os.path.join(data, n))) for n in sorted(os.listdir(data))]


def read_meta(folder: str) -> dict:
    with open(os.path.join(folder, META)) as f:
        return json.load(f)


def list_checkpoints(run: str) -> list[tuple[int, str]]:
    """(step, location) of every checkpoint of a run that Ray Train registered, oldest first.

    Ray Train registers a checkpoint in its snapshot file only once every worker has reported
    it; a folder that a crash during a save left behind is not in it and is ignored here, as Ray's
    own resume ignores it (the next save of that step replaces it). A run whose first checkpoint
    never registered has no snapshot yet, only Ray's marker: none of its folders counts. A run
    folder with neither (copied without them) lists every folder; `resolve` then checks each
    folder's parts itself.
    """
    found = step_folders(run)
    registered = registered_checkpoints(run)
    if registered is None:
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
    if registered is None:  # not a Ray Train run folder: nothing here is ours to remove
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
    """The checkpoint folder names in Ray Train's checkpoint-manager snapshot of a run: none when
    Ray Train's run marker is there but no snapshot yet (Ray writes the snapshot when it registers
    the first checkpoint), None for a folder Ray Train did not write."""
    snapshot = storage.join(run, RAY_SNAPSHOT)
    if not storage.exists(snapshot):
        return set() if storage.exists(storage.join(run, RAY_MARKER)) else None
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


def incomplete(loc: str) -> str | None:
    """Why the checkpoint folder at `loc` is not complete, or None when it is: every worker's
    ``parts`` file is there (uploaded after the worker's other files) and each file it lists has
    the size it was written with. Folders written before there were parts files: rank 0's
    metadata and DeepSpeed's ``latest`` tag."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(loc)
    path = path.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as err:
        raise CheckpointError(f"cannot list {loc}: {err}") from None
    sizes = {
        info.path[len(path) :].lstrip("/"): info.size
        for info in infos
        if info.type == pafs.FileType.File
    }
    if not sizes:
        return "no files"
    if META not in sizes:
        return f"no {META}: worker 0's part never finished uploading"
    if not any(name.startswith(PARTS + "/") for name in sizes):
        return None if "latest" in sizes else "no DeepSpeed 'latest' tag"
    world = json.loads(storage.read_bytes(storage.join(loc, META)))["world_size"]
    for rank in range(world):
        rel = f"{PARTS}/rank-{rank:05d}.json"
        if rel not in sizes:
            return f"no {rel}: worker {rank}'s part never finished uploading"
        for name, size in json.loads(storage.read_bytes(storage.join(loc, rel)))["files"].items():
            if name not in sizes:
                return f"{name} (worker {rank}) is missing"
            if sizes[name] != size:
                return f"{name} (worker {rank}) has {sizes[name]} bytes of the {size} written"
    return None


def resolve(run_or_checkpoint: str, best: bool = False) -> str:
    """A complete checkpoint location from a run folder (its latest, or with ``best`` the one
    with the best ``checkpoint.score_metric``) or from a checkpoint folder."""
    if _STEP_DIR.search(run_or_checkpoint.rstrip("/")):
        why = incomplete(run_or_checkpoint)
        if why:
            raise CheckpointError(
                f"{run_or_checkpoint} is not a complete checkpoint ({why}): a save cut short "
                "by a crash leaves such a folder. Pass the run folder to take its latest "
                "complete checkpoint, or an earlier checkpoint_<step> folder"
            )
        return run_or_checkpoint
    candidates = [loc for _, loc in reversed(list_checkpoints(run_or_checkpoint))]
    complete = [loc for loc in candidates if not incomplete(loc)]
    if complete and best:
        return _best(run_or_checkpoint, complete)
    if complete:
        return complete[0]
    raise CheckpointError(
        f"no complete checkpoint under {run_or_checkpoint}: pass a run folder "
        "(<storage_path>/<name>) with at least one checkpoint Ray Train registered, or one of its "
        "checkpoint_<step> folders"
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
