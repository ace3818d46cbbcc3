"""Launching a run on a remote cluster: Ray's job API, or a KubeRay `RayJob` on Kubernetes.

Stands apart from the training code: it reads the run config only to validate it before anything
is submitted (and to size the RayJob's trainer group), then hands the file's text to the cluster,
where `python ray_jobs/cpt.py --config ...` runs it. The project itself is expected on the
cluster already (the image built from the repository's Dockerfile, working directory
/home/ray/raycpt), so no code travels with the job:

* Ray job API: the config's text travels in the job's runtime env (an environment variable)
  and is piped into `ray_jobs/cpt.py --config /dev/stdin`. A working_dir would replace the
  image's working directory, and with it `ray_jobs/cpt.py`.
* Kubernetes: the config goes into a ConfigMap mounted at /etc/raycpt on the Ray head (where the
  job's driver runs), owned by the RayJob so that deleting the RayJob deletes it too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from raycpt import __version__
from raycpt.config import CPTConfig, load_config

logger = logging.getLogger(__name__)

CONFIG_ENV = "RAYCPT_CONFIG_YAML"
ENTRYPOINT = "python ray_jobs/cpt.py --config {config}"
# Linux refuses a single environment string longer than 128 KiB (MAX_ARG_STRLEN).
MAX_CONFIG_BYTES = 100_000
# Exit codes of `raycpt submit` (and of a followed RayJob) by the job's final status.
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
EXIT_DETACHED = 130  # Ctrl-C left the job running

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
K8S_CONFIG_DIR, K8S_CONFIG_FILE = "/etc/raycpt", "cpt.yaml"
# KubeRay v1.7.0 (utils/constant.go): a RayJob name is a DNS-1035 label of at most 47 characters.
MAX_RAYJOB_NAME = 47
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class SubmitError(RuntimeError):
    """Submitting, watching or stopping a job failed; the message says what to do."""


def read_run_config(path: str | Path) -> tuple[CPTConfig, str]:
    """The validated config and the file's text: a typo fails here, before anything is sent."""
    cfg = load_config(path)
    text = Path(path).read_text()
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise SubmitError(
            f"{path} is {len(text.encode())} bytes; a submitted config may have at most "
            f"{MAX_CONFIG_BYTES}: move long lists (lexicons, protected terms) into files"
        )
    return cfg, text


def entrypoint(config: str, start_from: str | None = None) -> str:
    """The job's shell command: ray_jobs/cpt.py with a config path (and a start checkpoint)."""
    command = ENTRYPOINT.format(config=shlex.quote(config))
    return command + (f" --start-from {shlex.quote(start_from)}" if start_from else "")


def exit_code(status: str | None) -> int:
    """0 for a succeeded job, 3 for a stopped one, 1 otherwise."""
    return EXIT_CODES.get(str(status), 1)


# ---------------------------------------------------------------------------------------------
# Ray job API
# ---------------------------------------------------------------------------------------------


def job_client(address: str | None = None):
    """A JobSubmissionClient for a dashboard URL (default: RAY_ADDRESS, else a local cluster).

    Ray finds the auth token itself, as `ray job submit` does."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = address or "RAY_ADDRESS / the local cluster"
        raise SubmitError(
            f"cannot reach the Ray job API at {where}: {str(err).rstrip('.')}. Pass its URL with "
            "--address http://HEAD:8265 (e.g. after kubectl port-forward svc/...-head-svc 8265)"
        ) from None


def submit_job(client, config_path: str | Path, start_from: str | None = None) -> str:
    """Submit a run through the job API; returns the job id (raycpt-<run name>-<8 hex>)."""
    cfg, text = read_run_config(config_path)
    command = f'printf "%s" "${CONFIG_ENV}" | {entrypoint("/dev/stdin", start_from)}'
    return client.submit_job(
        entrypoint=command,
        submission_id=f"raycpt-{cfg.name}-{uuid.uuid4().hex[:8]}",
        runtime_env={"env_vars": {CONFIG_ENV: text}},
        metadata={"raycpt_run": cfg.name, "raycpt_config": Path(config_path).name},
    )


def follow_job(client, job_id: str, out: IO[str] | None = None) -> str:
    """Print the job's logs (to `out`, default stdout) as they come until it ends; returns its
    final status."""
    out = out or sys.stdout

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    return wait_job(client, job_id)


def wait_job(client, job_id: str, timeout_s: float = 60.0) -> str:
    """The job's status once terminal (the log stream can close a moment before)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal() or time.monotonic() > deadline:
            return str(status)
        time.sleep(0.5)


def job_status(client, job_id: str) -> dict[str, Any]:
    """What the job API knows of a job, as plain data."""
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as err:
        raise SubmitError(f"no job {job_id!r} on this cluster ({err})") from None
    fields = ("submission_id", "status", "message", "entrypoint", "start_time", "end_time")
    found = {key: getattr(info, key, None) for key in fields}
    found["status"] = str(found["status"])
    found["metadata"] = info.metadata
    return found


def stop_job(client, job_id: str, timeout_s: float = 60.0) -> str:
    """Ask the cluster to stop a job and wait until it has; returns its final status."""
    job_status(client, job_id)  # a clear error for an unknown id
    client.stop_job(job_id)
    return wait_job(client, job_id, timeout_s)


# ---------------------------------------------------------------------------------------------
# Kubernetes: a KubeRay RayJob
# ---------------------------------------------------------------------------------------------


@dataclass
class RayJobOptions:
    """What the RayJob needs beyond the run config; the CLI's --k8s flags map onto these."""

    namespace: str = "raycpt"
    name: str | None = None  # default: from the run name, with a random suffix
    image: str = f"raycpt:{__version__}"
    service_account: str = "raycpt"
    ttl_seconds: int = 3600
    backoff_limit: int = 2
    active_deadline_seconds: int | None = 172_800
    shutdown_after_finish: bool = True
    s3_secret: str | None = None  # a Secret whose keys become env (AWS_ACCESS_KEY_ID, ...)
    worker_cpu: str = "8"
    worker_memory: str = "64Gi"
    worker_shm: str = "16Gi"


def rayjob_name(run_name: str, given: str | None = None) -> str:
    """A valid RayJob name: `given` checked, or the run name made DNS-safe plus 6 hex digits."""
    if given is not None:
        if len(given) > MAX_RAYJOB_NAME or not _DNS1035.match(given):
            raise SubmitError(
                f"--name {given!r}: a RayJob name must be at most {MAX_RAYJOB_NAME} lowercase "
                "letters, digits and '-', starting with a letter and not ending with '-'"
            )
        return given
    base = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")
    base = re.sub(r"^[^a-z]+", "", base)[: MAX_RAYJOB_NAME - 7].rstrip("-") or "raycpt"
    return f"{base}-{uuid.uuid4().hex[:6]}"


def _labels(component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "raycpt",
        "app.kubernetes.io/part-of": "raycpt",
        "app.kubernetes.io/managed-by": "raycpt-cli",
        "app.kubernetes.io/component": component,
    }


_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 100,
    "fsGroup": 100,
    "seccompProfile": {"type": "RuntimeDefault"},
}
_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
# Caches on the scratch volume, as in k8s/rayjob.yaml and the Helm chart.
_SCRATCH_ENV = [
    {"name": "HF_HOME", "value": "/scratch/huggingface"},
    {"name": "RAYCPT_CACHE_DIR", "value": "/scratch/raycpt"},
    {"name": "TORCH_EXTENSIONS_DIR", "value": "/scratch/torch_extensions"},
]


def _resources(cpu: str, memory: str, gpus: int = 0) -> dict:
    """Requests equal to limits (GPUs cannot be overcommitted; memory should not be)."""
    amounts: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        amounts["nvidia.com/gpu"] = gpus
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _ray_pod(
    component: str, container: dict, volumes: list[dict], opts: RayJobOptions, **spec
) -> dict:
    """A restricted pod template for a Ray container with /dev/shm and /scratch emptyDirs."""
    container = {
        "image": opts.image,
        "workingDir": "/home/ray/raycpt",
        "env": list(_SCRATCH_ENV),
        "securityContext": _CONTAINER_SECURITY,
        **container,
    }
    if opts.s3_secret:
        container["envFrom"] = [{"secretRef": {"name": opts.s3_secret}}]
    container["volumeMounts"] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": "/scratch"},
    ] + container.get("volumeMounts", [])
    return {
        "metadata": {"labels": _labels(component)},
        "spec": {
            "serviceAccountName": opts.service_account,
            "securityContext": _POD_SECURITY,
            "containers": [container],
            "volumes": volumes,
            **spec,
        },
    }


def _scratch_volumes(shm: str, scratch: str) -> list[dict]:
    return [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
        {"name": "scratch", "emptyDir": {"sizeLimit": scratch}},
    ]


def _head_group(config_map: str, opts: RayJobOptions) -> dict:
    """The head: GCS, dashboard and the job's driver, which reads the mounted config."""
    container = {
        "name": "ray-head",
        "ports": [
            {"name": "gcs-server", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
            {"name": "client", "containerPort": 10001},
        ],
        "resources": _resources("2", "8Gi"),
        "volumeMounts": [{"name": "run-config", "mountPath": K8S_CONFIG_DIR, "readOnly": True}],
    }
    volumes = _scratch_volumes("2Gi", "20Gi") + [
        {"name": "run-config", "configMap": {"name": config_map}}
    ]
    return {
        # No Ray work on the head: training and data work land on the trainer pods.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": _ray_pod("head", container, volumes, opts),
    }


def _trainer_group(cfg: CPTConfig, opts: RayJobOptions) -> dict:
    """One pod per Ray Train worker (scaling.num_workers), one GPU each when use_gpu."""
    gpus = 1 if cfg.scaling.use_gpu else 0
    grace = 600  # SIGTERM to SIGKILL: time to write a pre-emption checkpoint
    container = {
        "name": "ray-worker",
        "resources": _resources(opts.worker_cpu, opts.worker_memory, gpus),
        # the training workers checkpoint before Kubernetes signals `ray start` (drain.py)
        "lifecycle": {
            "preStop": {"exec": {"command": ["raycpt", "drain", "--timeout", str(grace - 15)]}}
        },
    }
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": grace,
    }
    if gpus:
        spec["nodeSelector"] = {"nvidia.com/gpu.present": "true"}
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    volumes = _scratch_volumes(opts.worker_shm, "200Gi")
    workers = cfg.scaling.num_workers
    return {
        "groupName": "trainer",
        "replicas": workers,
        "minReplicas": workers,
        "maxReplicas": workers,
        "rayStartParams": {},
        "template": _ray_pod("worker-trainer", container, volumes, opts, **spec),
    }


def _submitter_pod(opts: RayJobOptions) -> dict:
    """KubeRay fills in the `ray job submit` command; this makes the pod restricted."""
    container = {
        "name": "ray-job-submitter",
        "image": opts.image,
        "resources": {
            "requests": {"cpu": "200m", "memory": "256Mi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        },
        "securityContext": _CONTAINER_SECURITY,
    }
    spec = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": _POD_SECURITY,
        "containers": [container],
    }
    return {"metadata": {"labels": _labels("ray-job-submitter")}, "spec": spec}


def rayjob_manifest(
    cfg: CPTConfig, name: str, opts: RayJobOptions, start_from: str | None = None
) -> dict:
    """The RayJob (ray.io/v1): k8s/rayjob.yaml's shape, sized from the run config."""
    spec: dict[str, Any] = {
        "entrypoint": entrypoint(f"{K8S_CONFIG_DIR}/{K8S_CONFIG_FILE}", start_from),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": opts.shutdown_after_finish,
        "ttlSecondsAfterFinished": opts.ttl_seconds,
        # Each retry runs on a fresh cluster and resumes from the run's last checkpoint.
        "backoffLimit": opts.backoff_limit,
        "submitterPodTemplate": _submitter_pod(opts),
        "rayClusterSpec": {
            "rayVersion": _ray_version(),
            # KubeRay generates the token Secret; dashboard and job API require it.
            "authOptions": {"mode": "token"},
            "headGroupSpec": _head_group(f"{name}-config", opts),
            "workerGroupSpecs": [_trainer_group(cfg, opts)],
        },
    }
    if opts.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = opts.active_deadline_seconds
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": opts.namespace,
            "labels": _labels("ray-job"),
            "annotations": {"raycpt/run": cfg.name},
        },
        "spec": spec,
    }


def _ray_version() -> str:
    import ray

    return ray.__version__


def config_map_manifest(rayjob: dict, text: str) -> dict:
    """The run config as a ConfigMap owned by the RayJob (created: it carries the uid)."""
    meta = rayjob["metadata"]
    owner = {
        "apiVersion": rayjob["apiVersion"],
        "kind": rayjob["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{meta['name']}-config",
            "namespace": meta["namespace"],
            "labels": _labels("run-config"),
            "ownerReferences": [owner],
        },
        "data": {K8S_CONFIG_FILE: text},
    }


def kube_api(context: str | None = None):
    """An ApiClient from the kubeconfig (KUBECONFIG, ~/.kube/config), else the pod's account."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise SubmitError("--k8s needs the Kubernetes client: pip install 'raycpt[k8s]'") from None
    try:
        # KUBECONFIG read now: the client's own default was fixed when it was imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), context=context)
    except (config.ConfigException, OSError) as err:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise SubmitError(
                f"no Kubernetes credentials: {err}. Set KUBECONFIG or --context"
            ) from None
    return client.ApiClient()


def _api_error(action: str, err) -> SubmitError:
    """An ApiException as a message that says what to do about it."""
    import json

    try:
        message = json.loads(err.body).get("message", err.body)
    except (TypeError, ValueError, AttributeError):
        message = err.body or err.reason
    hints = {
        401: "check your kubeconfig credentials",
        403: "your account lacks the permission (k8s/rbac.yaml's raycpt-job-submitter Role "
        "grants what raycpt needs)",
        404: "is the namespace right, and is the KubeRay operator (its RayJob CRD) installed?",
        409: "the name is taken: pass another --name, or `raycpt stop --k8s NAME` first",
        422: "the API server rejected the object",
    }
    hint = hints.get(err.status, "")
    return SubmitError(f"{action}: HTTP {err.status} {message}" + (f" ({hint})" if hint else ""))


def submit_rayjob(
    api,
    config_path: str | Path,
    opts: RayJobOptions,
    start_from: str | None = None,
) -> dict:
    """Create the RayJob and its config's ConfigMap; returns the RayJob as created."""
    from kubernetes import client

    cfg, text = read_run_config(config_path)
    body = rayjob_manifest(cfg, rayjob_name(cfg.name, opts.name), opts, start_from)
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    where = f"RayJob {opts.namespace}/{body['metadata']['name']}"
    try:
        created = custom.create_namespaced_custom_object(
            GROUP, VERSION, opts.namespace, PLURAL, body, field_validation="Strict"
        )
    except client.ApiException as err:
        raise _api_error(f"creating {where}", err) from None
    try:
        core.create_namespaced_config_map(
            opts.namespace, config_map_manifest(created, text), field_validation="Strict"
        )
    except client.ApiException as err:
        _delete_quietly(custom, body["metadata"]["name"], opts.namespace)
        raise _api_error(
            f"creating the ConfigMap of {where} (the RayJob was deleted)", err
        ) from None
    return created


def _delete_quietly(custom, name: str, namespace: str) -> None:
    from kubernetes import client

    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except client.ApiException as err:
        logger.warning("could not delete RayJob %s/%s: %s", namespace, name, err.reason)


def rayjob_finished(status: dict) -> bool:
    """KubeRay is done with the RayJob: it completed, failed, or was suspended."""
    return status.get("jobDeploymentStatus") in ("Complete", "Failed", "Suspended")


def rayjob_exit_code(status: dict) -> int:
    """Exit code of a finished RayJob: its Ray job's status; a failed deployment is 1."""
    if status.get("jobDeploymentStatus") == "Failed":
        return 1
    return exit_code(status.get("jobStatus"))


def watch_rayjob(
    api,
    name: str,
    namespace: str,
    on_change: Callable[[dict], None],
    timeout_s: int = 300,
) -> dict:
    """Watch a RayJob until KubeRay is done with it; calls `on_change(status)` on each new
    (jobDeploymentStatus, jobStatus) pair and returns the final status. Reconnects when the
    server ends the watch (every `timeout_s`)."""
    from kubernetes import client, watch

    custom = client.CustomObjectsApi(api)
    seen = None
    while True:
        stream = watch.Watch()
        try:
            for event in stream.stream(
                custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                field_selector=f"metadata.name={name}",
                timeout_seconds=timeout_s,
            ):
                obj = event["object"]
                if obj.get("metadata", {}).get("name") != name:
                    continue
                if event["type"] == "DELETED":
                    raise SubmitError(f"RayJob {namespace}/{name} was deleted before it finished")
                status = obj.get("status") or {}
                now = (status.get("jobDeploymentStatus"), status.get("jobStatus"))
                if now != seen:
                    seen = now
                    on_change(status)
                if rayjob_finished(status):
                    stream.stop()
                    return status
        except client.ApiException as err:
            if err.status != 410:  # 410: the watch's resourceVersion expired; start again
                raise _api_error(f"watching RayJob {namespace}/{name}", err) from None


def rayjob_status(api, name: str, namespace: str) -> dict:
    """The RayJob's status block (jobDeploymentStatus, jobStatus, message, dashboardURL...)."""
    from kubernetes import client

    try:
        obj = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
    except client.ApiException as err:
        raise _api_error(f"reading RayJob {namespace}/{name}", err) from None
    return {"name": name, "namespace": namespace, **(obj.get("status") or {})}


def stop_rayjob(api, name: str, namespace: str) -> None:
    """Delete the RayJob: KubeRay stops the job and deletes its cluster; the ConfigMap goes
    with it (owner reference)."""
    from kubernetes import client

    try:
        client.CustomObjectsApi(api).delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
        )
    except client.ApiException as err:
        raise _api_error(f"deleting RayJob {namespace}/{name}", err) from None
