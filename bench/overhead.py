"""What Ray Train costs per step: `raycpt train` (Ray Train + DeepSpeed ZeRO-2, 2 CPU workers)
against the very same worker loop launched by `torchrun` with no Ray at all.

    python bench/overhead.py [--steps 80] [--repeats 3] [--ray-idle] [--workers 2] [--workdir DIR]

Same model (the demo's small Llama built from a config), data, DeepSpeed config and loop code
(`raycpt.train.loop.Worker`): under torchrun, Ray Train's four calls (context, checkpoint, report,
Checkpoint) are replaced by plain stand-ins, so the difference is Ray's: its worker group, the
report round trip to the controller, and whatever Ray's processes take from the CPUs. Steps/s are
measured across reporting windows after the first (start-up excluded), reports included, from the
`wall_time` each window records. Runs alternate Ray / torchrun; medians are printed.

`--ray-idle` adds a third launcher: torchrun again, while a local Ray cluster started as `raycpt
train` starts it (`launch.init_ray`) sits idle beside it. Its gap to plain torchrun is what Ray's
own processes take from the cores; the rest of Ray's cost is Ray Train's per-step path.

`--workers 1` trains with one worker (global batch 16 in 2 micro-batches), leaving one of two
cores to Ray's processes: what Ray costs where a node has a core beyond its trainers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import run_config, setup  # noqa: E402  (the same corpus, tokenizer, run)

from raycpt.config import parse_config  # noqa: E402


def steps_per_s(history: list[dict], last_step: int) -> float:
    """Steps per second between the first window and the last one before the final step."""
    windows = [h for h in history if "wall_time" in h and h["step"] < last_step]
    first, last = windows[0], windows[-1]
    return (last["step"] - first["step"]) / (last["wall_time"] - first["wall_time"])


def ray_run(cfg_dict: dict) -> float:
    import ray

    from raycpt import checkpoint as ckpt
    from raycpt.train import launch

    cfg = parse_config(cfg_dict)
    launch.init_ray()
    try:
        launch.run(cfg)
    finally:
        ray.shutdown()  # the torchrun runs get a machine without Ray's processes
    history = ckpt.read_meta(ckpt.fetch(ckpt.resolve(launch.run_dir(cfg))))["history"]
    return steps_per_s(history, cfg.train.max_steps)


def torchrun_run(cfg_dict: dict, work: Path) -> float:
    workers = cfg_dict["scaling"]["num_workers"]
    cfg_path = work / "torchrun-config.json"
    out = work / "torchrun-history.json"
    cfg_path.write_text(json.dumps(cfg_dict))
    from raycpt.train.launch import DEFAULT_ENV

    env = {**os.environ, **{k: v for k, v in DEFAULT_ENV.items() if v}, "DS_ACCELERATOR": "cpu"}
    # One thread per process, as Ray gives an actor with 1 CPU (torchrun itself sets this only
    # for more than one process)
    env.setdefault("OMP_NUM_THREADS", "1")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    subprocess.run(
        [
            torchrun,
            "--standalone",
            f"--nproc-per-node={workers}",
            __file__,
            "--worker",
            str(cfg_path),
        ],
        env=env,
        check=True,
        cwd=work,
    )
    return steps_per_s(json.loads(out.read_text()), cfg_dict["train"]["max_steps"])


def worker_main(cfg_path: str) -> None:
    """One torchrun process: the Worker loop with Ray Train's calls replaced by stand-ins."""
    import types

    import ray.train
    import torch.distributed

    from raycpt.config import CPTConfig
    from raycpt.train import loop

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    history: list[dict] = []
    ctx = types.SimpleNamespace(get_world_rank=lambda: rank, get_world_size=lambda: world)
    ray.train.get_context = lambda: ctx
    ray.train.get_checkpoint = lambda: None
    ray.train.report = lambda metrics, **_: history.append(dict(metrics))
    cfg = CPTConfig.model_validate(json.loads(Path(cfg_path).read_text()))
    loop.Worker(cfg, None).fit()
    if rank == 0:
        (Path(cfg_path).parent / "torchrun-history.json").write_text(json.dumps(history))
    torch.distributed.destroy_process_group()  # as Ray Train does at the end of a run
    # and leave without C++ static destructors: at interpreter exit a worker aborted twice in 16
    # runs ("terminate called without an active exception": a joinable std::thread destroyed,
    # even after the process group was), failing the benchmark after its numbers were written
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default="/tmp/raycpt-bench")
    p.add_argument("--workers", type=int, default=2, help="1 leaves a core to Ray's processes")
    p.add_argument("--ray-idle", action="store_true", help="also time torchrun beside idle Ray")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args.worker)
        return
    import shutil

    work = Path(args.workdir)
    data, tok, vocab = setup(work)
    ray_rates, torch_rates, idle_rates = [], [], []
    for i in range(args.repeats):
        shutil.rmtree(work / "runs", ignore_errors=True)
        configs = [
            run_config(work, f"ovh-{launcher}-{i}", 2, args.steps, data, tok, vocab)  # ZeRO-2
            for launcher in ("ray", "torchrun")
        ]
        for c in configs:
            c["scaling"]["num_workers"] = args.workers
        ray_rates.append(ray_run(configs[0]))
        cfg = configs[1]
        torch_rates.append(torchrun_run(cfg, work))
        line = {"repeat": i, "ray_steps_per_s": ray_rates[-1], "torchrun": torch_rates[-1]}
        if args.ray_idle:
            import ray

            from raycpt.train import launch

            launch.init_ray()
            try:
                idle_rates.append(torchrun_run(cfg, work))
            finally:
                ray.shutdown()
            line["torchrun_beside_idle_ray"] = idle_rates[-1]
        print(json.dumps(line))
    r, t = statistics.median(ray_rates), statistics.median(torch_rates)
    summary = {
        "ray_steps_per_s": r,
        "torchrun_steps_per_s": t,
        "ray_cost": 1 - r / t,
        "ray_all": ray_rates,
        "torchrun_all": torch_rates,
    }
    if idle_rates:
        idle = statistics.median(idle_rates)
        summary.update(
            torchrun_beside_idle_ray=idle,
            idle_ray_cost=1 - idle / t,
            idle_all=idle_rates,
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
