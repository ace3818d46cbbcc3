"""Paths, and the checks that no schema expresses: the restricted Pod Security Standard,
container resources, and the rules KubeRay's controller enforces on top of its CRDs."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "raycpt"
EXAMPLES = CHART / "examples"
K8S_DIR = REPO / "k8s"
DATA = Path(__file__).resolve().parent / "data"
CRD_DIR = DATA / "kuberay-crds-v1.7.0"

# Kubernetes version the core objects are validated against (kubernetes-validate has 1.25-1.37).
KUBE_VERSION = "1.33"

# The values setups every chart test runs over: name -> values files.
VALUES_CASES = {
    "defaults": [],
    "gpu-8x-nodes": [EXAMPLES / "gpu-8x-nodes.yaml"],
    "minio-secret": [EXAMPLES / "minio-secret.yaml"],
    "rayjob": [EXAMPLES / "rayjob.yaml"],
}

# KubeRay v1.7.0, ray-operator/controllers/ray/utils/constant.go: a RayCluster name is at most
# 53 characters (63 minus "-serve-svc"), a RayJob name 47 (53 minus the "-xxxxx" suffix of the
# cluster it creates); both must be DNS-1035 labels (utils/validation.go).
MAX_RAYCLUSTER_NAME = 53
MAX_RAYJOB_NAME = 47
# utils.PodName / utils.CheckName keep 50 characters of the cluster name for pod names and the
# generated auth Secret; the chart stays within that so those names are not rewritten.
MAX_UNCUT_CLUSTER_NAME = 50
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# ---------------------------------------------------------------------------------------------
# walking rendered objects
# ---------------------------------------------------------------------------------------------


def cluster_templates(spec: dict) -> dict[str, dict]:
    found = {"head": spec["headGroupSpec"]["template"]}
    for group in spec.get("workerGroupSpecs", []):
        found[f"worker/{group['groupName']}"] = group["template"]
    return found


def pod_templates(doc: dict) -> dict[str, dict]:
    """Pod templates inside a rendered object, keyed by a readable role name."""
    if doc["kind"] == "Pod":
        return {"pod": {"metadata": doc["metadata"], "spec": doc["spec"]}}
    if doc["kind"] == "RayJob":
        found = {
            f"cluster/{key}": tmpl
            for key, tmpl in cluster_templates(doc["spec"]["rayClusterSpec"]).items()
        }
        if "submitterPodTemplate" in doc["spec"]:
            found["submitter"] = doc["spec"]["submitterPodTemplate"]
        return found
    if doc["kind"] == "RayCluster":
        return cluster_templates(doc["spec"])
    return {}


def cluster_spec(docs: list[dict]) -> dict:
    """The RayCluster spec of a render, in either mode."""
    for doc in docs:
        if doc["kind"] == "RayCluster":
            return doc["spec"]
        if doc["kind"] == "RayJob":
            return doc["spec"]["rayClusterSpec"]
    raise AssertionError("no RayCluster or RayJob rendered")


def worker_group(docs: list[dict], name: str) -> dict:
    groups = {g["groupName"]: g for g in cluster_spec(docs).get("workerGroupSpecs", [])}
    assert name in groups, f"worker group {name!r} not rendered; have {sorted(groups)}"
    return groups[name]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------------------------
# quantities and resources
# ---------------------------------------------------------------------------------------------

_SUFFIX = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}
_QUANTITY = re.compile(r"^([0-9.]+)([eE][-+]?[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?$")


def parse_quantity(value) -> Decimal:
    """A Kubernetes quantity ("500m", "16Gi", 4) as a number."""
    if isinstance(value, (int, float)):
        return Decimal(str(value))
    match = _QUANTITY.match(str(value))
    if not match:
        raise ValueError(f"not a quantity: {value!r}")
    number = Decimal(match.group(1) + (match.group(2) or ""))
    return number * Decimal(_SUFFIX[match.group(3) or ""])


def resource_violations(where: str, resources: dict | None) -> list[str]:
    """cpu and memory requests and limits present, requests <= limits, GPUs requested == limit."""
    problems = []
    resources = resources or {}
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    for key in ("cpu", "memory"):
        if key not in requests:
            problems.append(f"{where}: no {key} request")
        if key not in limits:
            problems.append(f"{where}: no {key} limit")
        if key in requests and key in limits:
            if parse_quantity(requests[key]) > parse_quantity(limits[key]):
                problems.append(f"{where}: {key} request {requests[key]} > limit {limits[key]}")
    for key in set(requests) | set(limits):
        if "/" in key and requests.get(key) != limits.get(key):
            # Extended resources (GPUs) cannot be overcommitted: requests must equal limits.
            problems.append(
                f"{where}: {key} request {requests.get(key)} != limit {limits.get(key)}"
            )
    return problems


# ---------------------------------------------------------------------------------------------
# Pod Security Standard "restricted" (https://kubernetes.io/docs/concepts/security/pod-security-standards/)
# ---------------------------------------------------------------------------------------------

_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(where: str, pod_spec: dict, extra_containers=()) -> list[str]:
    """What keeps a pod spec from the restricted Pod Security Standard."""
    problems = []
    pod_sc = pod_spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(field):
            problems.append(f"{where}: {field}")
    for volume in pod_spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            problems.append(f"{where}: volume {volume['name']} of type {sorted(kinds)}")
    containers = (
        list(pod_spec.get("containers", []))
        + list(pod_spec.get("initContainers", []))
        + list(extra_containers)
    )
    if not containers:
        problems.append(f"{where}: no containers")
    for container in containers:
        name = f"{where}/{container.get('name', '?')}"
        sc = container.get("securityContext", {})
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {caps['add']}")
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{name}: runs as UID 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile is {seccomp!r}")
        for port in container.get("ports", []):
            if port.get("hostPort"):
                problems.append(f"{name}: hostPort {port['hostPort']}")
    return problems


# ---------------------------------------------------------------------------------------------
# KubeRay controller rules (v1.7.0 ray-operator/controllers/ray/utils/validation.go)
# ---------------------------------------------------------------------------------------------


def kuberay_cluster_violations(spec: dict) -> list[str]:
    """The parts of ValidateRayClusterSpec that the chart's objects can break."""
    problems = []
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    groups = [("Head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]
    names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
    if len(set(names)) != len(names):
        problems.append(f"duplicate worker group names {names}")
    for name, group in groups:
        params = group.get("rayStartParams", {})
        if not group["template"]["spec"].get("containers"):
            problems.append(f"{name}: no containers")
        if any(
            params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")
        ) and group.get("resources"):
            problems.append(f"{name}: resources set in both rayStartParams and resources")
        if "labels" in params:
            problems.append(f"{name}: rayStartParams['labels'] is not supported")
        if "resources" in params:
            try:
                parsed = json.loads(params["resources"].strip("'\"` "))
            except ValueError as err:
                problems.append(f"{name}: rayStartParams resources is not JSON: {err}")
            else:
                if not all(isinstance(v, (int, float)) for v in parsed.values()):
                    problems.append(f"{name}: custom resources must be numbers: {parsed}")
        if name == "Head":
            continue
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            problems.append(f"{name}: minReplicas and maxReplicas needed without autoscaling")
        if lo is not None and lo < 0 or hi is not None and hi < 0:
            problems.append(f"{name}: negative replica bound")
        if lo is not None and hi is not None and lo > hi:
            problems.append(f"{name}: minReplicas {lo} > maxReplicas {hi}")
        if group.get("suspend") and autoscaling:
            problems.append(f"{name}: suspended with autoscaler enabled")
    options = spec.get("autoscalerOptions") or {}
    if options.get("idleTimeoutSeconds", 0) < 0:
        problems.append("autoscalerOptions.idleTimeoutSeconds is negative")
    if autoscaling and options.get("version") == "v2":
        for name, group in groups:
            policy = group["template"]["spec"].get("restartPolicy", "")
            if policy not in ("", "Never"):
                problems.append(f"{name}: restartPolicy {policy} with autoscaler v2")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token" and not spec.get("rayVersion"):
        problems.append("authOptions.mode token needs rayVersion")
    return problems


def kuberay_job_violations(job: dict) -> list[str]:
    """ValidateRayJobMetadata / ValidateRayJobSpec."""
    spec = job["spec"]
    problems = []
    name = job["metadata"]["name"]
    if len(name) > MAX_RAYJOB_NAME or not DNS1035_LABEL.match(name):
        problems.append(f"RayJob name {name!r} is not a DNS-1035 label of <= {MAX_RAYJOB_NAME}")
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        problems.append("suspend needs shutdownAfterJobFinishes")
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        problems.append("ttlSecondsAfterFinished is negative")
    if "rayClusterSpec" not in spec and not spec.get("clusterSelector"):
        problems.append("one of rayClusterSpec or clusterSelector must be set")
    mode = spec.get("submissionMode", "K8sJobMode")
    backoff = spec.get("backoffLimit")
    if mode == "InteractiveMode" and backoff:
        problems.append("backoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode":
        if "submitterPodTemplate" in spec or "submitterConfig" in spec:
            problems.append("SidecarMode takes no submitter template or config")
        head_policy = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].get(
            "restartPolicy", ""
        )
        if head_policy not in ("", "Never"):
            problems.append("SidecarMode needs the head restartPolicy Never or unset")
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        problems.append("activeDeadlineSeconds must be positive")
    if backoff is not None and backoff < 0:
        problems.append("backoffLimit must not be negative")
    if "rayClusterSpec" in spec:
        problems += kuberay_cluster_violations(spec["rayClusterSpec"])
    return problems


def kuberay_name_violations(doc: dict) -> list[str]:
    name = doc["metadata"]["name"]
    limit = MAX_RAYJOB_NAME if doc["kind"] == "RayJob" else MAX_RAYCLUSTER_NAME
    problems = []
    if len(name) > limit:
        problems.append(f"{doc['kind']} name {name!r} is longer than {limit}")
    if not DNS1035_LABEL.match(name):
        problems.append(f"{doc['kind']} name {name!r} is not a DNS-1035 label")
    return problems
