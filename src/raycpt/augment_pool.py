"""Where augmentation runs: an autoscaling pool of Ray actors, or inside the reader thread.

The pool is a Ray Serve deployment: Serve's replica autoscaling is Ray's own machinery for a
pool of stateful actors that grows with queued requests and shrinks when idle, between
``min_actors`` and ``max_actors``. Replicas ask for CPUs (and any custom resource, e.g. the Helm
chart's ``augment``) only, so on Kubernetes they land on the CPU augmentation group and the KubeRay
autoscaler adds nodes when the pool grows. No HTTP proxy is started: workers call it through a
deployment handle. Because every document's output depends only on (seed, id, epoch, config), the
pool's size and scheduling never change what is trained on.
"""

from __future__ import annotations

from collections import Counter

from ray import serve

from raycpt.augment import Augmenter
from raycpt.config import AugmentConfig
from raycpt.stream import Transform

DEPLOYMENT = "AugmentActor"


@serve.deployment(name=DEPLOYMENT)
class AugmentActor:
    """One actor of the pool: an Augmenter built once from the config."""

    def __init__(self, config: dict):
        self.augmenter = Augmenter(AugmentConfig.model_validate(config))

    def __call__(self, texts: list[str], ids: list[str], epoch: int, progress: float):
        return self.augmenter.apply_batch(texts, ids, epoch, progress)


def app_name(run: str) -> str:
    return f"raycpt-augment-{run}"


def deploy(cfg: AugmentConfig, run: str) -> str:
    """Start (or update) the run's augmentation pool; returns its Serve application name."""
    pool = cfg.pool
    serve.start(proxy_location="Disabled")
    app = AugmentActor.options(
        autoscaling_config={
            "min_replicas": pool.min_actors,
            "initial_replicas": max(pool.min_actors, 1),
            "max_replicas": pool.max_actors,
            "target_ongoing_requests": pool.target_ongoing_requests,
            "upscale_delay_s": pool.upscale_delay_s,
            "downscale_delay_s": pool.downscale_delay_s,
            "metrics_interval_s": 1.0,
            "look_back_period_s": 3.0,
        },
        ray_actor_options={"num_cpus": pool.cpus_per_actor, "resources": pool.resources},
    ).bind(cfg.model_dump(mode="json"))
    name = app_name(run)
    serve.run(app, name=name, route_prefix=None)
    return name


def shutdown(name: str) -> None:
    serve.delete(name)


def pool_transform(name: str, batch_docs: int) -> Transform:
    """A reader transform that fans a unit out to the pool in batches and gathers in order."""
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=name)

    def transform(texts, ids, epoch, progress):
        calls = [
            handle.remote(texts[i : i + batch_docs], ids[i : i + batch_docs], epoch, progress)
            for i in range(0, len(texts), batch_docs)
        ]
        out, counts = [], Counter()
        for call in calls:
            part, c = call.result()
            out.extend(part)
            counts.update(c)
        return out, dict(counts)

    return transform


def local_transform(cfg: AugmentConfig) -> Transform:
    """The same transforms inside the worker's reader thread (pool.max_actors: 0)."""
    return Augmenter(cfg).apply_batch
