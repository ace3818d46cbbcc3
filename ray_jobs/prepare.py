"""Ray job entry point for `prepare` as a Ray Data job over the cluster's CPU workers.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/prepare.py --config prepare.yaml

Connects to the cluster the job was submitted to (RAY_ADDRESS, set by Ray's job supervisor), or
starts a local Ray when run directly; `engine: auto` then curates on Ray Data (64+ input files),
`engine: ray` always does.
"""

import argparse
import json
import logging
import sys

import ray

from raycpt.config import ConfigError, PrepareConfig, load_config
from raycpt.prepare import PrepareError, prepare


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the prepare YAML config")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, PrepareConfig)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    ray.init()
    try:
        manifest = prepare(cfg)
    except PrepareError as err:
        print(err, file=sys.stderr)
        return 1
    summary = {k: manifest[k] for k in ("documents_in", "documents_out", "dropped", "redactions")}
    print("raycpt prepare:", json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
