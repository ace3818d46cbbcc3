"""The Helm chart: lints, renders objects an API server and KubeRay accept, and refuses bad values
with a message that names the value."""

from __future__ import annotations

import json
import re
import shutil
import tarfile

import pytest
import yaml

from .k8s_support import (
    CHART,
    DATA,
    MAX_UNCUT_CLUSTER_NAME,
    VALUES_CASES,
    cluster_spec,
    env_of,
    kuberay_cluster_violations,
    kuberay_job_violations,
    kuberay_name_violations,
    one,
    pod_templates,
    resource_violations,
    restricted_violations,
    worker_group,
)

BAD_VALUES = DATA / "values"
CASES = list(VALUES_CASES)


def rendered(render, case: str) -> list[dict]:
    return render(VALUES_CASES[case])


# ---------------------------------------------------------------------------------------------
# lint and render
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_helm_lint_strict_passes(helm, case):
    args = [a for path in VALUES_CASES[case] for a in ("-f", str(path))]
    proc = helm("lint", "--strict", str(CHART), *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout


@pytest.mark.parametrize("case", CASES)
def test_every_rendered_object_validates(render, validate_object, case):
    docs = rendered(render, case)
    kinds = sorted(d["kind"] for d in docs)
    expected = {
        "defaults": ["Pod", "RayCluster", "ServiceAccount"],
        "gpu-8x-nodes": ["Pod", "RayCluster", "ServiceAccount"],
        "minio-secret": ["Pod", "RayCluster", "ServiceAccount"],
        "rayjob": ["ConfigMap", "RayJob", "ServiceAccount"],
    }[case]
    assert kinds == expected
    for doc in docs:
        validate_object(doc)
        assert doc["metadata"]["namespace"] == "raycpt"


@pytest.mark.parametrize("case", CASES)
def test_pod_templates_are_valid_core_pod_templates(render, validate_object, case):
    """Embedded templates checked again with Kubernetes' own PodTemplate schema (strict)."""
    for doc in rendered(render, case):
        for role, template in pod_templates(doc).items():
            carrier = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "check"},
                "template": template,
            }
            try:
                validate_object(carrier)
            except AssertionError as err:
                raise AssertionError(f"{doc['kind']} {role}: {err}") from None


@pytest.mark.parametrize("case", CASES)
def test_standard_labels_on_every_object_and_pod(render, case):
    for doc in rendered(render, case):
        targets = [doc["metadata"]] + [t["metadata"] for t in pod_templates(doc).values()]
        for meta in targets:
            labels = meta["labels"]
            assert labels["app.kubernetes.io/name"] == "raycpt"
            assert labels["app.kubernetes.io/instance"] == "cpt"
            assert labels["app.kubernetes.io/managed-by"] == "Helm"
            assert labels["helm.sh/chart"].startswith("raycpt-")
            assert all(len(v) <= 63 for v in labels.values())


# ---------------------------------------------------------------------------------------------
# what KubeRay and the cluster enforce beyond the schemas
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_kuberay_controller_rules_hold(render, case):
    for doc in rendered(render, case):
        if doc["kind"] == "RayCluster":
            assert kuberay_cluster_violations(doc["spec"]) == []
        if doc["kind"] == "RayJob":
            assert kuberay_job_violations(doc) == []
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert kuberay_name_violations(doc) == []


@pytest.mark.parametrize("case", CASES)
def test_gpu_group_requests_gpus_and_cpu_group_offers_augment(render, case):
    docs = rendered(render, case)
    trainer = worker_group(docs, "trainer")
    container = trainer["template"]["spec"]["containers"][0]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus >= 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert trainer["template"]["spec"]["tolerations"]
    assert trainer["template"]["spec"]["nodeSelector"]

    augment = worker_group(docs, "augment")
    augment_container = augment["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in augment_container["resources"]["limits"]
    custom = json.loads(augment["rayStartParams"]["resources"].strip("'"))
    assert custom["augment"] > 0

    head = cluster_spec(docs)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert ports["dashboard"] == 8265 and ports["client"] == 10001 and ports["gcs-server"] == 6379


@pytest.mark.parametrize("case", CASES)
def test_replica_bounds_are_ordered(render, case):
    for group in cluster_spec(rendered(render, case))["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group[
            "groupName"
        ]


def test_eight_gpu_nodes_layout(render):
    docs = rendered(render, "gpu-8x-nodes")
    trainer = worker_group(docs, "trainer")
    assert trainer["minReplicas"] == trainer["maxReplicas"] == trainer["replicas"] == 4
    spec = trainer["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    # The anti-affinity selector must match the trainer pods' own labels.
    labels = trainer["template"]["metadata"]["labels"]
    assert anti[0]["labelSelector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("case", CASES)
def test_autoscaler_is_on_with_values(render, case):
    spec = cluster_spec(rendered(render, case))
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    assert options["idleTimeoutSeconds"] == 300
    assert options["upscalingMode"] == "Default"
    assert resource_violations("autoscaler", options["resources"]) == []
    assert (
        restricted_violations("autoscaler", {"containers": [dict(options, name="autoscaler")]})
        == []
    )


def test_autoscaler_settings_come_from_values(render):
    spec = cluster_spec(
        render(
            set_values=[
                "autoscaler.idleTimeoutSeconds=42",
                "autoscaler.upscalingMode=Aggressive",
                "autoscaler.version=v2",
            ]
        )
    )
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == 42
    assert spec["autoscalerOptions"]["upscalingMode"] == "Aggressive"
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert kuberay_cluster_violations(spec) == []


@pytest.mark.parametrize("case", CASES)
def test_every_pod_is_restricted(render, case):
    for doc in rendered(render, case):
        for role, template in pod_templates(doc).items():
            assert restricted_violations(f"{doc['kind']}/{role}", template["spec"]) == []
            assert template["spec"]["securityContext"]["runAsUser"] == 1000


@pytest.mark.parametrize("case", CASES)
def test_every_container_has_requests_and_limits(render, case):
    for doc in rendered(render, case):
        for role, template in pod_templates(doc).items():
            for container in template["spec"]["containers"]:
                where = f"{doc['kind']}/{role}/{container['name']}"
                assert resource_violations(where, container.get("resources")) == []


@pytest.mark.parametrize("case", CASES)
def test_shm_and_scratch_volumes(render, case):
    for doc in rendered(render, case):
        if doc["kind"] not in ("RayCluster", "RayJob"):
            continue
        for role, template in pod_templates(doc).items():
            if role == "submitter":
                continue
            spec = template["spec"]
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
            assert volumes["dshm"]["emptyDir"]["sizeLimit"]
            assert volumes["scratch"]["emptyDir"]["sizeLimit"]
            container = spec["containers"][0]
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert mounts["dshm"] == "/dev/shm"
            assert mounts["scratch"] == "/scratch"
            env = env_of(container)
            assert env["HF_HOME"]["value"].startswith("/scratch/")
            assert env["RAYCPT_CACHE_DIR"]["value"].startswith("/scratch/")


@pytest.mark.parametrize("case", CASES)
def test_worker_termination_grace_period_and_token(render, case):
    docs = rendered(render, case)
    spec = cluster_spec(docs)
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 300
        assert pod["automountServiceAccountToken"] is False
        # the pre-emption checkpoint: `raycpt drain` before Kubernetes signals `ray start`
        hook = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert hook == [
            "raycpt",
            "drain",
            "--timeout",
            str(pod["terminationGracePeriodSeconds"] - 15),
        ]
    # The head keeps its token: the autoscaler sidecar talks to the API server.
    assert "automountServiceAccountToken" not in spec["headGroupSpec"]["template"]["spec"]
    assert "lifecycle" not in spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert worker_group(docs, "trainer")["template"]["spec"]["terminationGracePeriodSeconds"] == (
        900 if case == "gpu-8x-nodes" else 600
    )


# ---------------------------------------------------------------------------------------------
# object storage and identity
# ---------------------------------------------------------------------------------------------


def test_nothing_secret_by_default(render):
    docs = render()
    assert not [d for d in docs if d["kind"] == "Secret"]
    head = cluster_spec(docs)["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = env_of(head)
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
    ):
        assert name not in env


def test_minio_endpoint_and_existing_secret(render):
    docs = rendered(render, "minio-secret")
    for role, template in pod_templates(one(docs, "RayCluster")).items():
        env = env_of(template["spec"]["containers"][0])
        assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio.svc.cluster.local:9000"
        assert env["AWS_REGION"]["value"] == "us-east-1"
        key_id = env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]
        secret = env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
        assert key_id == {"name": "raycpt-minio", "key": "access-key"}, role
        assert secret == {"name": "raycpt-minio", "key": "secret-key"}, role
        assert "AWS_SESSION_TOKEN" not in env
        assert "value" not in env["AWS_SECRET_ACCESS_KEY"]


def test_session_token_is_mapped_when_named(render):
    docs = render(
        VALUES_CASES["minio-secret"],
        set_values=["objectStorage.credentials.sessionTokenKey=session-token"],
    )
    head = cluster_spec(docs)["headGroupSpec"]["template"]["spec"]["containers"][0]
    ref = env_of(head)["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "raycpt-minio", "key": "session-token"}


def test_irsa_annotation_on_created_service_account(render):
    docs = rendered(render, "gpu-8x-nodes")
    account = one(docs, "ServiceAccount")
    assert account["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/raycpt-training"
    }
    for template in pod_templates(one(docs, "RayCluster")).values():
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_existing_service_account(render):
    docs = render(set_values=["serviceAccount.create=false", "serviceAccount.name=ml-storage"])
    assert not [d for d in docs if d["kind"] == "ServiceAccount"]
    for template in pod_templates(one(docs, "RayCluster")).values():
        assert template["spec"]["serviceAccountName"] == "ml-storage"
    # No name and nothing created: KubeRay gives the head a ServiceAccount of its own.
    docs = render(set_values=["serviceAccount.create=false"])
    for template in pod_templates(one(docs, "RayCluster")).values():
        assert "serviceAccountName" not in template["spec"]


def test_auth_mode(render):
    assert cluster_spec(render())["authOptions"] == {"mode": "token"}
    docs = render(set_values=["auth.mode=disabled"])
    assert cluster_spec(docs)["authOptions"] == {"mode": "disabled"}
    test_pod = one(docs, "Pod")
    assert "RAY_AUTH_TOKEN" not in env_of(test_pod["spec"]["containers"][0])


# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------


def test_long_release_names_are_cut_to_kuberay_limits(render):
    release = "a" + "b" * 52  # helm's own limit for release names is 53
    cluster = one(render(release=release), "RayCluster")
    assert len(cluster["metadata"]["name"]) <= MAX_UNCUT_CLUSTER_NAME
    assert kuberay_name_violations(cluster) == []
    test_pod = one(render(release=release), "Pod")
    assert len(test_pod["metadata"]["name"]) <= 63
    job = one(render(VALUES_CASES["rayjob"], release=release), "RayJob")
    assert kuberay_name_violations(job) == []
    config_map = one(render(VALUES_CASES["rayjob"], release=release), "ConfigMap")
    assert len(config_map["metadata"]["name"]) <= 63


def test_name_that_is_not_a_dns1035_label_fails(helm):
    proc = helm("template", "cpt", str(CHART), "--set", "fullnameOverride=1st-run")
    assert proc.returncode != 0
    assert 'RayCluster name "1st-run" is not a DNS-1035 label' in proc.stderr


# ---------------------------------------------------------------------------------------------
# RayJob mode
# ---------------------------------------------------------------------------------------------


def test_rayjob_mode(render):
    docs = rendered(render, "rayjob")
    assert not [d for d in docs if d["kind"] in ("RayCluster", "Pod")]
    job = one(docs, "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"] == "python ray_jobs/cpt.py --config /etc/raycpt/cpt.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 3600
    assert spec["backoffLimit"] == 2
    assert spec["activeDeadlineSeconds"] == 172800
    assert spec["submissionMode"] == "K8sJobMode"
    config_map = one(docs, "ConfigMap")
    config = yaml.safe_load(config_map["data"]["cpt.yaml"])
    assert config["scaling"]["num_workers"] == 8
    for role, template in pod_templates(job).items():
        if role == "submitter":
            continue
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["run-config"]["configMap"]["name"] == config_map["metadata"]["name"]
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["run-config"]["mountPath"] == "/etc/raycpt"
        assert mounts["run-config"]["readOnly"] is True


def test_rayjob_cluster_is_the_standalone_cluster(render):
    job_docs = rendered(render, "rayjob")
    cluster_docs = render(VALUES_CASES["rayjob"], set_values=["rayJob.enabled=false"])
    assert (
        one(job_docs, "RayJob")["spec"]["rayClusterSpec"] == one(cluster_docs, "RayCluster")["spec"]
    )


def test_example_run_configs_are_valid_raycpt_configs(render):
    config = pytest.importorskip("raycpt.config")
    text = one(rendered(render, "rayjob"), "ConfigMap")["data"]["cpt.yaml"]
    cfg = config.parse_config(yaml.safe_load(text), source="examples/rayjob.yaml")
    # One Ray Train worker per GPU of the example's trainer pods.
    trainer = worker_group(rendered(render, "rayjob"), "trainer")
    gpus = trainer["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == trainer["maxReplicas"] * gpus
    config.load_config(DATA / "run-config.yaml")


def test_rayjob_config_path_and_entrypoint_overrides(render):
    job = one(
        render(set_values=["rayJob.enabled=true", "rayJob.configPath=configs/smoke.yaml"]), "RayJob"
    )
    assert job["spec"]["entrypoint"] == "python ray_jobs/cpt.py --config configs/smoke.yaml"
    job = one(
        render(
            set_values=[
                "rayJob.enabled=true",
                "rayJob.submissionMode=HTTPMode",
                "rayJob.entrypoint=python ray_jobs/cpt.py --help",
            ]
        ),
        "RayJob",
    )
    assert job["spec"]["entrypoint"] == "python ray_jobs/cpt.py --help"
    assert "submitterPodTemplate" not in job["spec"]
    assert kuberay_job_violations(job) == []


def test_rayjob_without_a_config_fails(helm):
    proc = helm("template", "cpt", str(CHART), "--set", "rayJob.enabled=true")
    assert proc.returncode != 0
    assert "rayJob.enabled needs a run config" in proc.stderr


# ---------------------------------------------------------------------------------------------
# wrong values fail with the schema's (or the chart's) message
# ---------------------------------------------------------------------------------------------

# Refused by values.schema.json: helm lint and helm template both fail.
WRONG_VALUES = {
    "replicas-as-string.yaml": "at '/workerGroups/trainer/minReplicas': got string, want integer",
    "unknown-key.yaml": "at '/head': additional properties 'replica' not allowed",
    "unknown-group-key.yaml": "at '/workerGroups/augment': additional properties 'gpu' not allowed",
    "negative-replicas.yaml": "at '/workerGroups/augment/maxReplicas': minimum: got -1, want 0",
    "bad-quantity.yaml": "at '/head/resources/limits/memory'",
    "bad-group-name.yaml": "invalid propertyName 'Trainer_GPU'",
    "no-cpu-limit.yaml": "at '/workerGroupDefaults/resources/limits': missing property 'cpu'",
    "bad-submission-mode.yaml": "at '/rayJob/submissionMode': value must be one of",
}

# Refused by a `fail` in the templates (no JSON Schema construct compares two values): helm
# template / install / upgrade fail; helm lint renders in lint mode, where Helm reports a
# `fail` as "[INFO] Fail: ..." without failing, so there the message only has to show.
FAILED_BY_TEMPLATE = {
    "max-below-min.yaml": "workerGroups.trainer: minReplicas (3) must not exceed maxReplicas (2)",
    "replicas-out-of-range.yaml": (
        "workerGroups.augment: replicas (9) must lie between minReplicas (0) and maxReplicas (4)"
    ),
    "config-not-yaml.yaml": "config.content is not valid YAML",
    "interactive-with-retries.yaml": (
        "rayJob.backoffLimit must be 0 with submissionMode InteractiveMode"
    ),
}


@pytest.mark.parametrize("name", sorted(WRONG_VALUES))
def test_wrong_values_fail_lint_and_template(helm, name):
    values = BAD_VALUES / name
    lint = helm("lint", "--strict", str(CHART), "-f", str(values))
    assert lint.returncode != 0
    assert WRONG_VALUES[name] in lint.stdout + lint.stderr
    template = helm("template", "cpt", str(CHART), "-f", str(values))
    assert template.returncode != 0
    assert WRONG_VALUES[name] in template.stderr


@pytest.mark.parametrize("name", sorted(FAILED_BY_TEMPLATE))
def test_inconsistent_values_fail_template(helm, name):
    values = BAD_VALUES / name
    template = helm("template", "cpt", str(CHART), "-f", str(values))
    assert template.returncode != 0
    assert FAILED_BY_TEMPLATE[name] in template.stderr
    lint = helm("lint", "--strict", str(CHART), "-f", str(values))
    assert f"Fail: {FAILED_BY_TEMPLATE[name]}" in lint.stdout + lint.stderr


def test_set_string_for_a_count_is_refused(helm):
    proc = helm("template", "cpt", str(CHART), "--set-string", "workerGroups.trainer.replicas=1")
    assert proc.returncode != 0
    assert "at '/workerGroups/trainer/replicas': got string, want integer" in proc.stderr


# ---------------------------------------------------------------------------------------------
# values documentation
# ---------------------------------------------------------------------------------------------


def test_every_value_is_documented_with_a_double_dash_comment():
    """Each key either has a `# --` comment right above it or sits in a documented block."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    documented_blocks: list[int] = []  # indents of enclosing keys that carry a `# --` comment
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)(- )?([A-Za-z0-9_.\-/]+):(.*)$", line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent = len(match.group(1))
        documented_blocks = [i for i in documented_blocks if i < indent]
        above = index - 1
        while (
            above >= 0
            and lines[above].strip().startswith("#")
            and not lines[above].strip().startswith("# --")
        ):
            above -= 1
        has_doc = above >= 0 and lines[above].strip().startswith("# --")
        is_block = match.group(4).strip() == ""
        if has_doc and is_block:
            documented_blocks.append(indent)
        if not is_block and not has_doc and not documented_blocks:
            undocumented.append(line.strip())
    assert undocumented == []


def test_schema_is_draft7_and_closed():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    open_objects = []

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                if node.get("additionalProperties") is not False:
                    open_objects.append(path)
            for key, sub in node.items():
                walk(sub, f"{path}/{key}")
        elif isinstance(node, list):
            for i, sub in enumerate(node):
                walk(sub, f"{path}/{i}")

    walk(schema, "")
    assert open_objects == []


# ---------------------------------------------------------------------------------------------
# NOTES.txt
# ---------------------------------------------------------------------------------------------


def render_notes(helm, tmp_path, *args: str) -> str:
    """helm template does not print NOTES.txt: render it through a copy of the chart."""
    chart = tmp_path / "raycpt"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text(
        '{{- define "test.notes" -}}\n' + notes + "{{- end -}}\n"
    )
    (chart / "templates" / "notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ include "test.notes" . | quote }}\n'
    )
    proc = helm(
        "template",
        "cpt",
        str(chart),
        "-n",
        "raycpt",
        "--show-only",
        "templates/notes.yaml",
        *args,
        check=True,
    )
    return yaml.safe_load(proc.stdout)["data"]["notes"]


def test_notes_tell_how_to_submit(helm, tmp_path):
    notes = render_notes(helm, tmp_path)
    assert "kubectl -n raycpt port-forward service/cpt-raycpt-head-svc 8265:8265" in notes
    assert (
        "ray job submit --address http://localhost:8265 --working-dir . -- "
        "python ray_jobs/cpt.py --config configs/<your-run>.yaml"
    ) in notes
    assert "kubectl -n raycpt get secret cpt-raycpt -o jsonpath='{.data.auth_token}'" in notes
    assert "helm test cpt -n raycpt" in notes


def test_notes_point_at_the_mounted_config(helm, tmp_path):
    notes = render_notes(
        helm,
        tmp_path,
        "--set",
        "auth.mode=disabled",
        "--set-file",
        f"config.content={DATA / 'run-config.yaml'}",
    )
    assert "--config /etc/raycpt/cpt.yaml" in notes
    assert "RAY_AUTH_TOKEN" not in notes


def test_notes_in_rayjob_mode(helm, tmp_path):
    notes = render_notes(helm, tmp_path, "-f", str(VALUES_CASES["rayjob"][0]))
    assert "python ray_jobs/cpt.py --config /etc/raycpt/cpt.yaml" in notes
    assert "kubectl -n raycpt logs -f job/cpt-raycpt" in notes


# ---------------------------------------------------------------------------------------------
# README and the umbrella chart with the KubeRay operator
# ---------------------------------------------------------------------------------------------


def documented_keys() -> list[str]:
    """Dotted paths of the keys that carry a `# --` comment in values.yaml."""
    keys, stack, pending = [], [], False
    for line in (CHART / "values.yaml").read_text().splitlines():
        if line.strip().startswith("# --"):
            pending = True
            continue
        match = re.match(r"^(\s*)([A-Za-z0-9_.\-/]+):", line)
        if not match:
            continue
        indent = len(match.group(1))
        stack = [(i, k) for i, k in stack if i < indent] + [(indent, match.group(2))]
        if pending:
            keys.append(".".join(k for _, k in stack))
        pending = False
    return keys


def test_readme_documents_every_value():
    readme = (CHART / "README.md").read_text()
    keys = documented_keys()
    assert len(keys) > 60
    missing = [key for key in keys if f"| `{key}` |" not in readme]
    assert missing == []


STACK = CHART / "stack"


def test_umbrella_declares_the_optional_operator(helm):
    chart = yaml.safe_load((STACK / "Chart.yaml").read_text())
    deps = {d["name"]: d for d in chart["dependencies"]}
    assert deps["kuberay-operator"] == {
        "name": "kuberay-operator",
        "version": "1.7.0",
        "repository": "https://ray-project.github.io/kuberay-helm/",
        "condition": "kuberay-operator.enabled",
    }
    assert deps["raycpt"]["repository"] == "file://.."
    assert (
        deps["raycpt"]["version"] == yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    )
    values = yaml.safe_load((STACK / "values.yaml").read_text())
    assert values["kuberay-operator"]["enabled"] is False
    listed = helm("dependency", "list", str(STACK), check=True).stdout
    assert "kuberay-operator\t1.7.0  \thttps://ray-project.github.io/kuberay-helm/" in listed


def test_chart_package_leaves_the_umbrella_out(helm, tmp_path):
    helm("package", str(CHART), "-d", str(tmp_path), check=True)
    (package,) = tmp_path.glob("raycpt-*.tgz")
    names = tarfile.open(package).getnames()
    assert "raycpt/values.schema.json" in names
    assert "raycpt/templates/tests/test-dashboard.yaml" in names
    assert not [n for n in names if n.startswith("raycpt/stack/")]


def test_raycpt_works_as_the_umbrellas_subchart(helm, tmp_path, validate_object):
    """Offline, the operator cannot be fetched: build the umbrella without it and render."""
    stack = tmp_path / "stack"
    shutil.copytree(STACK, stack)
    chart = yaml.safe_load((stack / "Chart.yaml").read_text())
    chart["dependencies"] = [
        dict(d, repository=f"file://{CHART}")
        for d in chart["dependencies"]
        if d["name"] == "raycpt"
    ]
    (stack / "Chart.yaml").write_text(yaml.safe_dump(chart))
    helm("dependency", "build", str(stack), check=True)
    proc = helm(
        "template", "cpt", str(stack), "-n", "raycpt",
        "--set", "raycpt.workerGroups.trainer.gpus=2", check=True,
    )  # fmt: skip
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    for doc in docs:
        validate_object(doc)
    limits = worker_group(docs, "trainer")["template"]["spec"]["containers"][0]["resources"]
    assert limits["limits"]["nvidia.com/gpu"] == 2
    bad = helm("template", "cpt", str(stack), "--set", "raycpt.head.replica=1")
    assert "at '/head': additional properties 'replica' not allowed" in bad.stderr
