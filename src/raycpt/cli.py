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

    info = export(args.checkpoint, args.out, best=args.best, merge=args.merge)
    print(json.dumps(info, default=str))


def cmd_vocab(args) -> None:
    from raycpt import vocab
    from raycpt.train.engine import load_tokenizer

    cfg = load_config(args.config)
    texts = list(vocab.read_texts(cfg.data.sources, args.max_docs))
    result = vocab.report(texts, load_tokenizer(cfg.model), args.top, args.min_count)
    for t in result["terms"]:
        print(f"{t['term']:<30} count {t['count']:>8}  pieces {t['pieces']:>3}  score {t['score']}")
    print(
        f"tokens per document: {result['tokens_per_doc_before']:.1f} -> "
        f"{result['tokens_per_doc_after']:.1f} ({100 * result['reduction']:.1f}% fewer, "
        f"{result['documents']} documents)"
    )
    if args.out:
        vocab.write_terms_file(args.out, result, f"raycpt vocab --config {args.config}")
        print(f"wrote {len(result['terms'])} terms to {args.out}: set model.vocab_file to use them")


def cmd_eval(args) -> None:
    from raycpt.evaluate import evaluate_folder

    r = evaluate_folder(
        args.model, args.dataset, args.split, args.seq_len, args.max_tokens, best=args.best
    )
    print(json.dumps(r.metrics()))


def cmd_report(args) -> None:
    from raycpt.report import write_report

    out = args.out or "report"
    print(json.dumps(write_report(args.run, out)))


def cmd_demo(args) -> None:
    from raycpt.demo import format_summary, run_demo

    work = Path(args.workdir)
    print(f"raycpt demo: working folder {work.resolve()}", flush=True)
    summary = run_demo(work, base_steps=args.base_steps, cpt_steps=args.cpt_steps)
    print(format_summary(summary))
    print(
        f"\neverything is in {work.resolve()} (models: base-model/, cpt-model/; runs: runs/; "
        "the CPT run's report: report/report.html)"
    )


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


# --- submit / status / stop: a run on a remote cluster (Ray job API, or a KubeRay RayJob) ----


def _stop_after_interrupt(args, what: str) -> bool:
    """After Ctrl-C: --stop-on-interrupt stops; a terminal is asked; anything else detaches."""
    if args.stop_on_interrupt:
        return True
    if not sys.stdin.isatty():
        return False
    try:
        return input(f"\nstop {what}? [y/N] ").strip().lower().startswith("y")
    except (EOFError, KeyboardInterrupt):
        return False


def _rayjob_options(args):
    from raycpt.submit import RayJobOptions

    return RayJobOptions(
        namespace=args.namespace,
        name=args.name,
        image=args.image,
        service_account=args.service_account,
        ttl_seconds=args.ttl,
        backoff_limit=args.backoff_limit,
        active_deadline_seconds=args.active_deadline or None,
        shutdown_after_finish=not args.keep_cluster,
        s3_secret=args.s3_secret,
        worker_cpu=args.worker_cpu,
        worker_memory=args.worker_memory,
    )


def _print_rayjob_status(status: dict) -> None:
    deployment, job = status.get("jobDeploymentStatus") or "New", status.get("jobStatus") or "-"
    line = f"RayJob: {deployment}, job {job}"
    extra = [status[k] for k in ("message", "dashboardURL") if status.get(k)]
    print(line + (f" ({'; '.join(extra)})" if extra else ""), flush=True)


def _submit_k8s(args) -> int:
    from raycpt import submit

    api = submit.kube_api(args.context)
    created = submit.submit_rayjob(api, args.config, _rayjob_options(args), args.start_from)
    name, ns = created["metadata"]["name"], created["metadata"]["namespace"]
    if args.no_wait:
        print(name)
        return 0
    print(f"created RayJob {ns}/{name}; its logs: kubectl -n {ns} logs -f job/{name}", flush=True)
    try:
        status = submit.watch_rayjob(api, name, ns, _print_rayjob_status)
    except KeyboardInterrupt:
        if not _stop_after_interrupt(args, f"RayJob {ns}/{name}"):
            print(f"RayJob {ns}/{name} keeps running: raycpt status|stop --k8s {name} -n {ns}")
            return submit.EXIT_DETACHED
        submit.stop_rayjob(api, name, ns)
        print(f"deleted RayJob {ns}/{name}")
        return submit.exit_code("STOPPED")
    return submit.rayjob_exit_code(status)


def cmd_submit(args) -> int:
    from raycpt import submit

    if args.k8s:
        return _submit_k8s(args)
    client = submit.job_client(args.address)
    job_id = submit.submit_job(client, args.config, args.start_from)
    if args.no_wait:
        print(job_id)
        return 0
    print(f"submitted job {job_id}; Ctrl-C to stop following it", file=sys.stderr, flush=True)
    try:
        status = submit.follow_job(client, job_id)
    except KeyboardInterrupt:
        if not _stop_after_interrupt(args, f"job {job_id}"):
            print(f"job {job_id} keeps running: raycpt status|stop {job_id}", file=sys.stderr)
            return submit.EXIT_DETACHED
        status = submit.stop_job(client, job_id)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return submit.exit_code(status)


def cmd_status(args) -> int:
    from raycpt import submit

    if args.k8s:
        found = submit.rayjob_status(submit.kube_api(args.context), args.k8s, args.namespace)
    else:
        found = submit.job_status(submit.job_client(args.address), args.job)
    print(json.dumps(found, indent=2, default=str))
    return 0


def cmd_stop(args) -> int:
    from raycpt import submit

    if args.k8s:
        submit.stop_rayjob(submit.kube_api(args.context), args.k8s, args.namespace)
        print(f"deleted RayJob {args.namespace}/{args.k8s}")
    else:
        status = submit.stop_job(submit.job_client(args.address), args.job)
        print(f"job {args.job}: {status}")
    return 0


def cmd_drain(args) -> int:
    from raycpt import drain

    return 1 if drain.drain(args.timeout) else 0


def _add_cluster_args(s) -> None:
    s.add_argument("--address", help="Ray dashboard URL (default: RAY_ADDRESS, else local Ray)")
    s.add_argument("--namespace", "-n", default="raycpt", help="with --k8s (default: raycpt)")
    s.add_argument("--context", help="with --k8s: kubeconfig context (default: current)")


def add_submit_commands(sub) -> None:
    """`raycpt submit`, `raycpt status` and `raycpt stop`."""
    from raycpt.submit import RayJobOptions as Opt

    s = sub.add_parser("submit", help="submit a run to a Ray cluster, or as a RayJob (--k8s)")
    s.add_argument("config", help="the run's YAML config (validated here, sent to the cluster)")
    s.add_argument("--start-from", help="a checkpoint to start a new run from")
    s.add_argument("--no-wait", action="store_true", help="print the job id (name) and return")
    s.add_argument(
        "--stop-on-interrupt", action="store_true", help="Ctrl-C stops the job without asking"
    )
    _add_cluster_args(s)
    k = s.add_argument_group("Kubernetes (--k8s): a KubeRay RayJob and a ConfigMap")
    k.add_argument("--k8s", action="store_true", help="create a RayJob instead of using --address")
    k.add_argument("--name", help="RayJob name (default: the run name + a random suffix)")
    k.add_argument("--image", default=Opt.image, help=f"Ray image (default: {Opt.image})")
    k.add_argument("--service-account", default=Opt.service_account, help="of the Ray pods")
    k.add_argument(
        "--ttl", type=int, default=Opt.ttl_seconds, help="seconds a finished RayJob is kept"
    )
    k.add_argument(
        "--backoff-limit", type=int, default=Opt.backoff_limit, help="retries on a new cluster"
    )
    k.add_argument(
        "--active-deadline",
        type=int,
        default=Opt.active_deadline_seconds,
        help="seconds the whole job may take (0: no limit)",
    )
    k.add_argument(
        "--keep-cluster", action="store_true", help="keep the Ray cluster after the job ends"
    )
    k.add_argument("--s3-secret", help="Secret whose keys become env (AWS_ACCESS_KEY_ID, ...)")
    k.add_argument("--worker-cpu", default=Opt.worker_cpu, help="per trainer pod")
    k.add_argument("--worker-memory", default=Opt.worker_memory, help="per trainer pod")
    s.set_defaults(fn=cmd_submit)

    for command, fn, what in (
        ("status", cmd_status, "the status of a submitted job or RayJob"),
        ("stop", cmd_stop, "stop a submitted job, or delete a RayJob"),
    ):
        s = sub.add_parser(command, help=what)
        which = s.add_mutually_exclusive_group(required=True)
        which.add_argument("job", nargs="?", help="Ray job id (from raycpt submit)")
        which.add_argument("--k8s", metavar="NAME", help="a RayJob's name")
        _add_cluster_args(s)
        s.set_defaults(fn=fn)


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
    s.add_argument("--best", action="store_true", help="the run's best-scored checkpoint")
    s.add_argument("--merge", action="store_true", help="LoRA runs: merged weights, not adapter")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser(
        "eval", help="perplexity, bits per byte and calibration (ECE) on a prepared split"
    )
    s.add_argument("model", help="exported model folder, run folder or checkpoint folder")
    s.add_argument("dataset", help="prepared dataset folder or s3:// prefix")
    s.add_argument("--best", action="store_true", help="from a run folder: its best checkpoint")
    s.add_argument("--split", default="heldout")
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--max-tokens", type=int, default=200_000)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("report", help="an HTML page + PNG plots of a run's metrics")
    s.add_argument("run", help="run folder (<storage_path>/<name>) or checkpoint folder")
    s.add_argument("--out", help="output folder (default: ./report)")
    s.set_defaults(fn=cmd_report)

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

    s = sub.add_parser("vocab", help="propose domain terms to add to the tokenizer")
    s.add_argument("--config", required=True, help="the run config (its data.sources, model)")
    s.add_argument("--top", type=int, default=100, help="terms to propose")
    s.add_argument("--out", help="write them as a model.vocab_file (local or s3://)")
    s.add_argument("--max-docs", type=int, default=20_000, help="documents read per source")
    s.add_argument("--min-count", type=int, default=5, help="ignore rarer words")
    s.set_defaults(fn=cmd_vocab)

    s = sub.add_parser("config-reference", help="print the config reference (markdown)")
    s.set_defaults(fn=cmd_config_reference)

    s = sub.add_parser(
        "drain",
        help="pre-emption: SIGTERM this node's training workers and wait for their checkpoint "
        "(the chart's preStop hook)",
    )
    s.add_argument("--timeout", type=float, default=270.0, help="seconds to wait (default 270)")
    s.set_defaults(fn=cmd_drain)
    add_submit_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        code = args.fn(args)  # submit, status and stop return the job's exit code
    except ConfigError as err:
        print(f"raycpt: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError) as err:
        # Library errors (PrepareError, StorageError, ModelError, ...) carry their own fix.
        print(f"raycpt {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
