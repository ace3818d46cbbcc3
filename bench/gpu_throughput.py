"""GPU throughput and MFU of raycpt's DeepSpeed engine on a Llama-3.2-1B-shaped model.

    python bench/gpu_throughput.py --zero 2 --micro-batch 4 [--accum 4] [--compile] [--grad-ckpt]
        [--liger loss|all] [--ds-extra JSON] [--seq 2048]

One process, one GPU, no Ray (Ray Train's per-step cost is measured separately on CPU in
bench/train_step.py): the model, DeepSpeed config and optimizer are built by raycpt's own
`raycpt.train.engine` functions, exactly as a Ray Train worker builds them, and trained on random
tokens so that the number is the engine's, not the data path's. Prints one JSON line.

MFU counts 6 x (matmul parameters) + 12 x layers x hidden x seq FLOPs per token (PaLM's formula,
as torchtitan and LLM Foundry report it), against the GPU's dense bf16 peak; recomputation under
activation checkpointing is not counted.

`--liger loss` swaps Hugging Face's lm_head + cross-entropy for Liger-Kernel's fused linear
cross-entropy (the `[tokens, vocab]` logits are never materialised; PyPI `liger-kernel`, Triton);
`--liger all` also takes Liger's RMSNorm, SwiGLU and rotary kernels. `--ds-extra` is merged into
the DeepSpeed config as `deepspeed.extra` is. bench/gpu_sweep.sh runs the candidates in one
device call.
"""

import argparse
import functools
import json
import os
import time

import torch

PEAK_BF16 = {"H100": 989.5e12, "H200": 989.5e12, "A100": 312e12}

LLAMA_1B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}


def run_config(args):
    from raycpt.config import parse_config

    extra = json.loads(args.ds_extra) if args.ds_extra else {}

    return parse_config(
        {
            "name": "gpu-bench",
            "storage_path": "/tmp/unused",
            "model": {
                "init": LLAMA_1B,
                "tokenizer": "unused",
                "gradient_checkpointing": args.grad_ckpt,
                "compile": args.compile,
                "loss_chunk_tokens": args.loss_chunk,
            },
            "data": {"sources": [{"name": "random", "path": "unused"}], "seq_len": args.seq},
            "train": {
                "max_steps": args.steps,
                "micro_batch_size": args.micro_batch,
                "global_batch_size": args.micro_batch * args.accum,
                "lr": 1e-4,
            },
            "deepspeed": {"zero_stage": args.zero, "precision": "bf16", "extra": extra},
            "scaling": {"num_workers": 1, "use_gpu": True},
        }
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--compile", action="store_true", help="model.compile: regional torch.compile")
    p.add_argument("--loss-chunk", type=int, default=None, help="model.loss_chunk_tokens")
    p.add_argument("--liger", choices=["loss", "all"], default=None, help="Liger-Kernel kernels")
    p.add_argument("--ds-extra", default=None, help="JSON merged into the DeepSpeed config")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of 3 steps")
    args = p.parse_args()
    if args.liger and args.loss_chunk:
        p.error("--liger and --loss-chunk both replace the loss: choose one")
    if args.liger and args.zero == 3:
        # The fused loss reads lm_head.weight outside lm_head's forward, where ZeRO-3 has not
        # gathered it: it would see the rank's empty shard.
        p.error("--liger needs --zero 1 or 2")
    try:
        measure(args)
    except torch.OutOfMemoryError as err:  # a row of the sweep, not a traceback
        print(json.dumps({**_row(args), "error": f"out of memory: {str(err)[:160]}"}), flush=True)
        raise SystemExit(3) from None


def _row(args) -> dict:
    return {
        "zero": args.zero,
        "micro_batch": args.micro_batch,
        "accum": args.accum,
        "seq": args.seq,
        "grad_ckpt": args.grad_ckpt,
        "compile": args.compile,
        "loss_chunk": args.loss_chunk,
        "liger": args.liger,
        "ds_extra": args.ds_extra,
    }


def measure(args) -> None:
    for k, v in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29511",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }.items():
        os.environ.setdefault(k, v)

    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from raycpt.train.engine import (
        build_optimizer,
        chunked_causal_lm_loss,
        compile_layers,
        deepspeed_config,
    )

    deepspeed.init_distributed(dist_backend="nccl")
    torch.cuda.set_device(0)
    cfg = run_config(args)
    ds_config = deepspeed_config(cfg, "bf16", world_size=1)
    keep = HfDeepSpeedConfig(ds_config) if args.zero == 3 else None  # noqa: F841 (must stay alive)
    if args.liger:
        # Patches transformers' Llama classes, so it must come before the model is built.
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        every = args.liger == "all"
        apply_liger_kernel_to_llama(
            rope=every, rms_norm=every, swiglu=every, fused_linear_cross_entropy=True
        )
    fields = dict(LLAMA_1B)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("cuda" if args.zero != 3 else "cpu"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    if args.grad_ckpt:
        model.gradient_checkpointing_enable()
    if args.compile:
        compile_layers(model)
    if args.loss_chunk:
        model.loss_function = functools.partial(chunked_causal_lm_loss, chunk=args.loss_chunk)
    n_params = sum(getattr(q, "ds_numel", q.numel()) for q in model.parameters())
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    matmul_params = n_params - vocab * d + (vocab * d if config.tie_word_embeddings else 0)
    opt, sched = build_optimizer(model, cfg.train, cfg.horizon_steps, fused=True)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_config
    )
    tokens_per_step = args.micro_batch * args.accum * args.seq
    x = torch.randint(0, vocab, (args.micro_batch, args.seq), device="cuda")

    def step():
        for _ in range(args.accum):
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30), flush=True)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tps = tokens_per_step * args.steps / elapsed
    flops_per_token = 6 * matmul_params + 12 * layers * d * args.seq
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(
        json.dumps(
            {
                "gpu": name,
                **_row(args),
                "params": n_params,
                "step_s": elapsed / args.steps,
                "tokens_per_s": tps,
                "tflops": tps * flops_per_token / 1e12,
                "mfu": tps * flops_per_token / peak if peak else None,
                "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                "loss": loss.item(),
                "torch": torch.__version__,
                "deepspeed": deepspeed.__version__,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
