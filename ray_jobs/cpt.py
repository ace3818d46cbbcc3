"""Ray job entry point for a continued-pretraining run.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/cpt.py --config configs/local-cpu.yaml

Connects to the cluster the job was submitted to (RAY_ADDRESS, set by Ray's job supervisor), or
starts a local Ray when run directly. Running it again with the same config resumes the run.
"""

import argparse
import json
import logging
import sys

from raycpt.config import ConfigError, load_config
from raycpt.train import launch

PREEMPTED = 75  # EX_TEMPFAIL: try again later


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the run's YAML config")
    parser.add_argument("--start-from", help="checkpoint to start a new run (or stage) from")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    result = launch.run(cfg, start_from=args.start_from)
    print("raycpt result:", json.dumps(result.metrics, default=str))
    if (result.metrics or {}).get("preempted"):
        # checkpointed, not finished: a non-zero exit lets a RayJob's backoffLimit (or any
        # job runner's retry) submit it again, which resumes from that checkpoint
        return PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
