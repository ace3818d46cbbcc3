"""DeepSpeed's save_checkpoint alone, without Ray: 2 gloo processes, bench/checkpoint.py's model.

    python bench/deepspeed_save.py [--zero 2] [--saves 3] [--crc32]

Builds the ~79M-parameter Llama of bench/checkpoint.py (vocabulary 2048) on 2 CPU processes
with raycpt's ZeRO settings and a torch AdamW, trains one step, then times --saves
`engine.save_checkpoint` calls into a fresh folder each (the previous one deleted first), with
the zip CRC32s off as raycpt saves (--crc32: on, torch's default). Prints rank 0's seconds
and the bytes written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from checkpoint import model_fields
from torch.utils.serialization import config


def engine(zero: int):
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = model_fields(2048)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(fields.pop("model_type"), **fields)
    )
    ds = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": zero, "overlap_comm": True, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    eng = deepspeed.initialize(model=model, optimizer=opt, config=ds)[0]
    x = torch.randint(0, 2048, (1, 64))
    eng.backward(eng(input_ids=x, labels=x).loss)
    eng.step()
    return eng


def worker(rank: int, args) -> None:
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29633", "WORLD_SIZE": "2"}
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    eng = engine(args.zero)
    root = os.path.join(tempfile.gettempdir(), "raycpt-bench-dssave")
    for i in range(args.saves):
        folder = os.path.join(root, str(i))
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
        dist.barrier()
        t0 = time.perf_counter()
        with config.patch("save.compute_crc32", args.crc32):
            eng.save_checkpoint(folder, tag="ds")
        seconds = time.perf_counter() - t0
        if rank == 0:
            size = sum(
                os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(folder) for n in ns
            )
            print(f"save {i}: {seconds:.3f} s, {size / 1e9:.2f} GB", flush=True)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--crc32", action="store_true")
    mp.spawn(worker, args=(p.parse_args(),), nprocs=2)
