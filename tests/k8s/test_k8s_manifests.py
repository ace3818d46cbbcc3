"""The plain manifests in k8s/: complete, valid, least-privilege, and consistent with each other."""

from __future__ import annotations

import pytest
import yaml

from .k8s_support import (
    K8S_DIR,
    env_of,
    kuberay_job_violations,
    one,
    pod_templates,
    resource_violations,
    restricted_violations,
)


def load(path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def kustomization() -> dict:
    return yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def built(kubectl) -> list[dict]:
    """`kubectl kustomize k8s/` with the real kubectl (kustomize v5 built in)."""
    proc = kubectl("kustomize", str(K8S_DIR), check=True)
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def test_kustomization_lists_every_manifest_and_nothing_missing(kustomization):
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (K8S_DIR / name).is_file(), f"{name} listed but missing"
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == set(listed), "every manifest should be applied by kustomization.yaml"


def test_each_manifest_validates(kustomization, validate_object):
    for name in kustomization["resources"]:
        for doc in load(K8S_DIR / name):
            validate_object(doc)


def test_kustomize_build_validates(built, kustomization, validate_object):
    expected = sum(len(load(K8S_DIR / name)) for name in kustomization["resources"])
    assert len(built) == expected
    kinds = sorted(doc["kind"] for doc in built)
    assert kinds == [
        "ConfigMap",
        "Namespace",
        "RayJob",
        "Role",
        "RoleBinding",
        "Secret",
        "ServiceAccount",
        "ServiceAccount",
    ]
    for doc in built:
        validate_object(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "raycpt"


def test_rayjob_follows_the_pod_conventions(built, validate_object):
    job = one(built, "RayJob")
    assert kuberay_job_violations(job) == []
    assert job["spec"]["entrypoint"] == "python ray_jobs/cpt.py --config /etc/raycpt/cpt.yaml"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for role, template in pod_templates(job).items():
        spec = template["spec"]
        assert restricted_violations(role, spec) == []
        for container in spec["containers"]:
            assert resource_violations(f"{role}/{container['name']}", container["resources"]) == []
        validate_object(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "x"},
                "template": template,
            }
        )
        if role == "submitter":
            continue
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert "sizeLimit" in volumes["scratch"]["emptyDir"]
        env = env_of(spec["containers"][0])
        assert env["RAYCPT_CACHE_DIR"]["value"].startswith("/scratch/")
        if role != "cluster/head":
            assert spec["automountServiceAccountToken"] is False
            assert spec["terminationGracePeriodSeconds"] >= 300
            hook = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
            grace = spec["terminationGracePeriodSeconds"]
            assert hook == ["raycpt", "drain", "--timeout", str(grace - 15)]
    trainer = cluster["workerGroupSpecs"][0]
    limits = trainer["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert trainer["groupName"] == "trainer" and limits["nvidia.com/gpu"] == 1


def test_references_resolve(built):
    """Every ConfigMap, Secret (and key) and ServiceAccount the pods use is in the build."""
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in built:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    job = one(built, "RayJob")
    for role, template in pod_templates(job).items():
        spec = template["spec"]
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] in by_kind["ServiceAccount"], role
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in by_kind["ConfigMap"], role
        for container in spec["containers"]:
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = by_kind["Secret"][ref["name"]]
                    assert ref["key"] in secret["stringData"], (role, ref)
    binding = one(built, "RoleBinding")
    assert binding["roleRef"]["name"] in by_kind["Role"]
    for subject in binding["subjects"]:
        assert subject["name"] in by_kind["ServiceAccount"]
        assert subject["namespace"] == "raycpt"


def test_submitter_role_is_least_privilege(built):
    rules = one(built, "Role")["rules"]
    granted = {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert ("ray.io", "rayjobs", "create") in granted
    assert ("ray.io", "rayclusters", "get") in granted
    assert ("", "pods/log", "get") in granted
    assert ("", "configmaps", "create") in granted  # raycpt submit --k8s: the run config
    for group, resource, verb in granted:
        assert "*" not in (group, resource, verb)
        assert resource not in ("secrets", "pods/exec", "pods/attach", "roles", "rolebindings")
        if resource != "rayjobs" and (resource, verb) != ("configmaps", "create"):
            assert verb in ("get", "list", "watch"), (resource, verb)


def test_example_secret_holds_only_placeholders(built):
    secret = one(built, "Secret")
    assert "data" not in secret
    assert secret["stringData"]
    for key, value in secret["stringData"].items():
        assert value.startswith("REPLACE_WITH_"), key


def test_namespace_enforces_restricted(built):
    labels = one(built, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_run_config_is_a_valid_raycpt_config(built):
    config = pytest.importorskip("raycpt.config")
    text = one(built, "ConfigMap")["data"]["cpt.yaml"]
    cfg = config.parse_config(yaml.safe_load(text), source="k8s/configmap-run-config.yaml")
    assert cfg.scaling.num_workers == 2  # one rank per GPU of the two trainer pods
