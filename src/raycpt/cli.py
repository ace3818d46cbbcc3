"""The `raycpt` command: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from raycpt.config import ConfigError, PrepareConfig, load_config


def cmd_prepare(args) -> None:
    from raycpt.prepare import prepare

    if args.config:
        cfg = load_config(args.config, PrepareConfig)
    else:
        if not (args.inputs and args.output):
            raise ConfigError("prepare needs --config FILE, or INPUT... and --output LOCATION")
        overrides = {"inputs": args.inputs, "output": args.output}
        if args.heldout_fraction is not None:
            overrides["heldout_fraction"] = args.heldout_fraction
        from raycpt.config import parse_config

        cfg = parse_config(overrides, PrepareConfig, source="command line")
    manifest = prepare(cfg)
    print(json.dumps({k: v["num_docs"] for k, v in manifest["splits"].items()}))


def cmd_train(args) -> None:
    from raycpt.train import launch

    cfg = load_config(args.config)
    launch.init_ray(args.address)
    result = launch.run(cfg, start_from=args.start_from)
    print(json.dumps({k: v for k, v in (result.metrics or {}).items()}, default=str))


def cmd_export(args) -> None:
    from raycpt.export import export

    print(json.dumps(export(args.checkpoint, args.out), default=str))


def cmd_eval(args) -> None:
    from raycpt.evaluate import evaluate_folder

    r = evaluate_folder(args.model, args.dataset, args.split, args.seq_len, args.max_tokens)
    print(
        json.dumps(
            {"perplexity": r.perplexity, "bits_per_byte": r.bits_per_byte, "tokens": r.tokens}
        )
    )


def cmd_demo(args) -> None:
    from raycpt.demo import format_summary, run_demo

    work = Path(args.workdir)
    print(f"raycpt demo: working folder {work.resolve()}", flush=True)
    summary = run_demo(work, base_steps=args.base_steps, cpt_steps=args.cpt_steps)
    print(format_summary(summary))
    print(f"\neverything is in {work.resolve()} (models: base-model/, cpt-model/; runs: runs/)")


def cmd_inspect(args) -> None:
    from raycpt.inspect import describe

    print(json.dumps(describe(args.checkpoint, documents=args.documents), indent=2, default=str))


def cmd_augment_preview(args) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raycpt import storage
    from raycpt.augment import preview
    from raycpt.prepare import load_manifest

    cfg = load_config(args.config)
    source = next((s for s in cfg.data.sources if s.name == args.source), cfg.data.sources[0])
    shard = load_manifest(source.path)["splits"][source.split]["shards"][0]
    table = pq.read_table(
        pa.BufferReader(storage.read_bytes(storage.join(source.path, shard["path"])))
    )
    texts = table.column("text").to_pylist()[: args.n]
    ids = table.column("id").to_pylist()[: args.n]
    for i, (before, after, counts) in enumerate(preview(cfg.augment, texts, ids, args.progress)):
        print(f"=== document {ids[i]} ({source.name}, progress {args.progress}) {dict(counts)}")
        print("--- before\n" + before[: args.chars])
        print("+++ after\n" + after[: args.chars] + "\n")


def cmd_config_reference(args) -> None:
    from raycpt.config import reference_markdown

    print(reference_markdown(), end="")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raycpt", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare", help="raw text -> cleaned, deduplicated shards + manifest")
    s.add_argument("inputs", nargs="*", help="files or folders (.txt, .jsonl, .parquet)")
    s.add_argument("--output", help="folder or s3:// prefix")
    s.add_argument("--config", help="a YAML file with the prepare settings")
    s.add_argument("--heldout-fraction", type=float)
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("train", help="run (or resume) continued pretraining from a config")
    s.add_argument("--config", required=True)
    s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    s.add_argument("--start-from", help="a checkpoint to start a new run from (weights+data)")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("export", help="consolidate a checkpoint into a Hugging Face model folder")
    s.add_argument("checkpoint", help="run folder (<storage_path>/<name>) or checkpoint folder")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("eval", help="perplexity and bits per byte of a model on a prepared split")
    s.add_argument("model")
    s.add_argument("dataset")
    s.add_argument("--split", default="heldout")
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--max-tokens", type=int, default=200_000)
    s.set_defaults(fn=cmd_eval)

    from raycpt.demo import default_workdir

    s = sub.add_parser("demo", help="a small end-to-end CPT run on this machine")
    s.add_argument("--workdir", default=str(default_workdir()))
    s.add_argument("--base-steps", type=int, default=300)
    s.add_argument("--cpt-steps", type=int, default=150)
    s.set_defaults(fn=cmd_demo)
    s = sub.add_parser("inspect", help="print what a checkpoint records")
    s.add_argument("checkpoint", help="run folder (its latest) or checkpoint folder")
    s.add_argument("--documents", action="store_true", help="list the documents trained on")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("augment-preview", help="before/after of the configured augmentations")
    s.add_argument("--config", required=True)
    s.add_argument("--source", help="source name (default: the first)")
    s.add_argument("-n", type=int, default=3, help="documents to show")
    s.add_argument("--progress", type=float, default=1.0, help="point of the run (schedules)")
    s.add_argument("--chars", type=int, default=800, help="characters shown per document")
    s.set_defaults(fn=cmd_augment_preview)

    s = sub.add_parser("config-reference", help="print the config reference (markdown)")
    s.set_defaults(fn=cmd_config_reference)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        args.fn(args)
    except ConfigError as err:
        print(f"raycpt: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError) as err:
        # Library errors (PrepareError, StorageError, ModelError, ...) carry their own fix.
        print(f"raycpt {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
