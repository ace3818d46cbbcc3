"""What one checkpoint file costs to write on this machine, by where its bytes land.

    python bench/write_regimes.py [--mb 472] [--dir /tmp]

Writes one buffer of --mb MB (the size of a ZeRO-2 worker's optimizer shard in
bench/checkpoint.py) several ways, each timed alone: a raw file write and torch.save with and
without the zip CRC32s, each into page-cache memory a just-deleted file gave back ("recycled"),
and raw writes into files kept side by side, so each needs page-cache memory not held before
("fresh"). Prints seconds (best of 3 for the recycled rows) and GB/s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch.utils.serialization import config


def timed(write, path: str, keep: bool = False) -> float:
    t0 = time.perf_counter()
    write(path)
    seconds = time.perf_counter() - t0
    if not keep:
        os.remove(path)
    return seconds


def report(name: str, seconds: float, nbytes: int) -> None:
    print(f"{name:32s} {seconds:6.3f} s {nbytes / seconds / 1e9:5.2f} GB/s")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=472)
    p.add_argument("--dir", default=tempfile.gettempdir())
    args = p.parse_args()
    state = {"w": torch.randn(args.mb * 2**20 // 4)}
    nbytes = state["w"].numel() * 4
    folder = tempfile.mkdtemp(dir=args.dir)

    def raw(path: str) -> None:
        with open(path, "wb") as f:
            f.write(memoryview(state["w"].numpy()).cast("B"))

    def save(crc: bool):
        def write(path: str) -> None:
            with config.patch("save.compute_crc32", crc):
                torch.save(state, path)

        return write

    timed(raw, os.path.join(folder, "warm"))  # leaves recycled memory for the rows below
    rows = {"raw, recycled": raw, "torch.save crc32, recycled": save(True)}
    rows["torch.save no crc32, recycled"] = save(False)
    for name, write in rows.items():
        best = min(timed(write, os.path.join(folder, "x")) for _ in range(3))
        report(name, best, nbytes)
    for i in range(4):
        seconds = timed(raw, os.path.join(folder, f"kept{i}"), keep=True)
        report(f"raw, fresh (kept file {i})", seconds, nbytes)
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)


if __name__ == "__main__":
    main()
