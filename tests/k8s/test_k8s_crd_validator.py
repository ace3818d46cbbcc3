"""The CRD validator must be able to fail: it rejects what an API server rejects."""

from __future__ import annotations

import copy

import pytest

from .crd_validate import CRDValidationError


def minimal_raycluster() -> dict:
    container = {"name": "ray-head", "image": "rayproject/ray:2.60.0"}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "demo", "labels": {"app": "demo"}},
        "spec": {
            "rayVersion": "2.60.0",
            "headGroupSpec": {
                "rayStartParams": {"num-cpus": "0"},
                "template": {"spec": {"containers": [container]}},
            },
            "workerGroupSpecs": [
                {
                    "groupName": "cpu",
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "ray-worker",
                                    "image": "rayproject/ray:2.60.0",
                                    "resources": {"limits": {"cpu": 2, "memory": "4Gi"}},
                                }
                            ]
                        }
                    },
                }
            ],
        },
    }


def errors_of(crd_validator, doc) -> str:
    with pytest.raises(CRDValidationError) as info:
        crd_validator.validate(doc)
    return "\n".join(info.value.errors)


def test_accepts_a_minimal_raycluster_and_applies_defaults(crd_validator):
    out = crd_validator.validate(minimal_raycluster())
    group = out["spec"]["workerGroupSpecs"][0]
    # minReplicas / maxReplicas are required by the schema but defaulted first, as on a server.
    assert group["minReplicas"] == 0
    assert group["maxReplicas"] == 2147483647
    assert group["numOfHosts"] == 1


def test_rejects_an_unknown_field(crd_validator):
    doc = minimal_raycluster()
    doc["spec"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}  # typo
    assert "'rayStartParam' was unexpected" in errors_of(crd_validator, doc)


def test_rejects_an_unknown_field_inside_the_embedded_pod_template(crd_validator):
    doc = minimal_raycluster()
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert "'imagePullPolicyy' was unexpected" in errors_of(crd_validator, doc)


def test_rejects_a_wrong_type(crd_validator):
    doc = minimal_raycluster()
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "2"
    message = errors_of(crd_validator, doc)
    assert "spec.workerGroupSpecs[0].replicas: '2' is not of type 'integer'" in message


def test_rejects_int32_overflow(crd_validator):
    doc = minimal_raycluster()
    doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = 2**31
    assert "is greater than the maximum of 2147483647" in errors_of(crd_validator, doc)


def test_int_or_string_takes_both_but_not_a_boolean(crd_validator):
    doc = minimal_raycluster()
    limits = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"
    ]
    limits["cpu"] = "500m"
    crd_validator.validate(doc)
    limits["cpu"] = True
    assert "resources.limits.cpu" in errors_of(crd_validator, doc)


def test_drops_nulls_unless_nullable(crd_validator):
    doc = minimal_raycluster()
    doc["spec"]["rayVersion"] = None
    out = crd_validator.validate(doc)
    assert "rayVersion" not in out["spec"]
    doc = minimal_raycluster()
    doc["status"] = {"lastUpdateTime": None}  # nullable in the CRD: kept, and valid
    assert crd_validator.validate(doc)["status"] == {"lastUpdateTime": None}


def test_rejects_duplicate_keys_of_a_map_list(crd_validator):
    doc = minimal_raycluster()
    head = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["ports"] = [{"containerPort": 8265, "name": "a"}, {"containerPort": 8265, "name": "b"}]
    assert "duplicate entry" in errors_of(crd_validator, doc)


def test_reports_cel_rules_it_cannot_evaluate(crd_validator):
    doc = minimal_raycluster()
    doc["spec"]["managedBy"] = "somebody-else"
    assert "CEL rules are not evaluated" in errors_of(crd_validator, doc)


def test_checks_metadata_as_object_meta(crd_validator):
    doc = minimal_raycluster()
    doc["metadata"]["labels"] = {"replicas": 3}
    assert "metadata:" in errors_of(crd_validator, doc)


def test_validates_rayjob_too(crd_validator):
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "demo"},
        "spec": {
            "entrypoint": "python ray_jobs/cpt.py --config /etc/raycpt/cpt.yaml",
            "rayClusterSpec": copy.deepcopy(minimal_raycluster()["spec"]),
            "shutdownAfterJobFinishes": "yes",
        },
    }
    assert "shutdownAfterJobFinishes: 'yes' is not of type 'boolean'" in errors_of(
        crd_validator, job
    )
