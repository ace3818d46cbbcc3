"""`raycpt submit`, `status` and `stop`: against the session's real Ray cluster (its job API),
and with `--k8s` against kmock, an in-process FAKE Kubernetes API server (no real API server can
run on these machines). The fake stores what it is sent and plays KubeRay's part only where a
test scripts it to; the RayJob it receives is validated against the real KubeRay v1.7.0 CRD
schema, the ConfigMap against the Kubernetes schemas (kubernetes-validate, strict)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import kmock
import kubernetes_validate
import pytest
import yaml
from k8s.crd_validate import CRDValidator
from k8s.k8s_support import (
    CRD_DIR,
    KUBE_VERSION,
    kuberay_job_violations,
    pod_templates,
    resource_violations,
    restricted_violations,
)
from support import wait_for

from raycpt import cli, submit


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# Ray job API (the real local cluster)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_run(run_config, tmp_path):
    """A config for a short 1-worker ZeRO-0 run with a unique name, written to a file."""

    def make(**overrides) -> tuple[Path, dict]:
        small = {
            "name": f"submit-{uuid.uuid4().hex[:6]}",
            "scaling__num_workers": 1,
            "deepspeed__zero_stage": 0,
            "train__max_steps": 4,
            "train__global_batch_size": 4,
            "train__log_every": 2,
            "checkpoint__every_steps": 4,
        }
        cfg = run_config(**{**small, **overrides})
        return write_config(tmp_path / f"{cfg['name']}.yaml", cfg), cfg

    return make


@pytest.fixture
def free_tcp_port() -> int:
    """A loopback port nothing listens on."""
    from conftest import free_port

    return free_port()


def jobs_of(client, run_name: str) -> list:
    return [j for j in client.list_jobs() if (j.metadata or {}).get("raycpt_run") == run_name]


@pytest.mark.slow
def test_submit_follows_the_run_to_success(ray_cluster, small_run, capsys):
    """The job runs `ray_jobs/cpt.py` from the cluster's working directory: here the repository
    root, where conftest's `ray start` ran (in the image: /home/ray/raycpt)."""
    path, cfg = small_run()
    rc = cli.main(["submit", str(path), "--address", ray_cluster["dashboard"]])
    out, err = capsys.readouterr()
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "raycpt result:" in out  # the driver's last line, followed live from the cluster
    assert "SUCCEEDED" in err
    run_dir = Path(cfg["storage_path"]) / cfg["name"]
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")), f"no checkpoint in {run_dir}"


@pytest.mark.slow
def test_submit_exits_1_when_the_run_fails(ray_cluster, small_run, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    path, _ = small_run(model={"path": str(missing)})
    rc = cli.main(["submit", str(path), "--address", ray_cluster["dashboard"]])
    out, err = capsys.readouterr()
    assert rc == 1
    assert str(missing) in out  # the driver's error reached the user's terminal
    assert "FAILED" in err


def test_invalid_config_is_not_submitted(ray_cluster, small_run, capsys):
    path, cfg = small_run()
    text = path.read_text().replace("max_steps: 4", "max_stepz: 4")
    path.write_text(text)
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_cluster["dashboard"])
    rc = cli.main(["submit", str(path), "--address", ray_cluster["dashboard"]])
    assert rc == 2
    assert "train.max_stepz" in capsys.readouterr().err
    assert not jobs_of(client, cfg["name"])


@pytest.mark.slow
def test_status_and_stop_a_long_run(ray_cluster, small_run, capsys):
    path, cfg = small_run(train__max_steps=100_000)
    address = ["--address", ray_cluster["dashboard"]]
    assert cli.main(["submit", str(path), "--no-wait", *address]) == 0
    job_id = capsys.readouterr().out.strip()
    assert job_id.startswith(f"raycpt-{cfg['name']}-")

    def status() -> dict:
        assert cli.main(["status", job_id, *address]) == 0
        return json.loads(capsys.readouterr().out)

    running = wait_for(lambda: (s := status())["status"] == "RUNNING" and s, timeout=60)
    assert running["metadata"]["raycpt_run"] == cfg["name"]
    assert "ray_jobs/cpt.py --config /dev/stdin" in running["entrypoint"]

    assert cli.main(["stop", job_id, *address]) == 0
    assert capsys.readouterr().out.strip() == f"job {job_id}: STOPPED"
    assert status()["status"] == "STOPPED"


def test_status_of_an_unknown_job_says_so(ray_cluster, capsys):
    rc = cli.main(["status", "raycpt-nope-0", "--address", ray_cluster["dashboard"]])
    assert rc == 1
    assert "no job 'raycpt-nope-0'" in capsys.readouterr().err


def test_unreachable_job_api_says_how_to_fix(small_run, free_tcp_port, capsys):
    path, _ = small_run()
    rc = cli.main(["submit", str(path), "--address", f"http://127.0.0.1:{free_tcp_port}"])
    assert rc == 1
    assert "cannot reach the Ray job API" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_with_stop_on_interrupt_stops_the_job(ray_cluster, small_run):
    """A real `raycpt submit` process gets SIGINT while it follows a long run."""
    from ray.job_submission import JobSubmissionClient

    path, cfg = small_run(train__max_steps=100_000)
    raycpt = str(Path(sys.executable).with_name("raycpt"))
    proc = subprocess.Popen(
        [raycpt, "submit", str(path), "--address", ray_cluster["dashboard"]]
        + ["--stop-on-interrupt"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = JobSubmissionClient(ray_cluster["dashboard"])
    try:
        job = wait_for(
            lambda: next((j for j in jobs_of(client, cfg["name"]) if j.status == "RUNNING"), 0),
            timeout=60,
        )
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == submit.EXIT_CODES["STOPPED"], output[-3000:]
    assert str(client.get_job_status(job.submission_id)) == "STOPPED"


# ---------------------------------------------------------------------------------------------
# --k8s: RayJob + ConfigMap through kmock (a FAKE API server)
# ---------------------------------------------------------------------------------------------


class FakeKubernetes:
    """kmock's in-memory Kubernetes emulator on a loopback port, served from its own event loop
    in a thread (the `kubernetes` client is synchronous). Like a real API server, and unlike
    kmock's default, it answers a RayJob create with 201 and a uid."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)

    async def _start(self):
        self.emulator = kmock.KubernetesEmulator()
        self.server = kmock.Server(self.emulator)
        await self.emulator.__aenter__()
        await self.server.__aenter__()
        self.emulator.resources["ray.io/v1/rayjobs"] = kmock.ResourceInfo(
            kind="RayJob", namespaced=True, subresources={"status"}
        )
        self.uids: dict[str, str] = {}
        rayjobs = kmock.resource("ray.io/v1/rayjobs")
        self.emulator["create", rayjobs] << 201 << self._assign_uid
        self.url = str(self.server.url).rstrip("/")

    def _assign_uid(self, request) -> dict:
        meta = request.data["metadata"]
        self.uids[meta["name"]] = uid = str(uuid.uuid4())
        return {**request.data, "metadata": {**meta, "uid": uid}}

    def requests(self, plural: str, method: str) -> list:
        """The requests clients made for one resource, in order."""
        return [
            r
            for r in list(self.emulator)
            if r.method.value == method and r.resource is not None and r.resource.plural == plural
        ]

    def bodies(self, plural: str) -> list[dict]:
        """What clients sent to create objects of one resource (e.g. every RayJob)."""
        return [r.data for r in self.requests(plural, "POST")]

    def close(self):
        async def stop():
            await self.server.__aexit__(None, None, None)
            await self.emulator.__aexit__(None, None, None)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture
def fake_k8s(tmp_path, monkeypatch):
    """A fake API server and a kubeconfig pointing at it (as KUBECONFIG)."""
    fake = FakeKubernetes()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
        "users": [{"name": "me", "user": {"token": "test"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
        "current-context": "fake",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(path))
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def crd_validator() -> CRDValidator:
    return CRDValidator(sorted(CRD_DIR.glob("*.yaml")), KUBE_VERSION)


def play_kuberay(api, name: str, namespace: str, statuses: list[dict]) -> None:
    """Play KubeRay: once the RayJob exists, move its status subresource through `statuses`."""
    from kubernetes import client

    custom = client.CustomObjectsApi(api)

    def exists():
        try:
            return custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", name)
        except client.ApiException:
            return None

    wait_for(exists, timeout=30, interval=0.1)
    for status in statuses:
        custom.patch_namespaced_custom_object_status(
            "ray.io", "v1", namespace, "rayjobs", name, {"status": status}
        )


RUNNING = [
    {"jobDeploymentStatus": "Initializing"},
    {"jobDeploymentStatus": "Running", "jobStatus": "PENDING"},
    {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "dashboardURL": "cpt-head:8265"},
]


@pytest.mark.parametrize(
    "job_status, deployment, code",
    [("SUCCEEDED", "Complete", 0), ("FAILED", "Complete", 1), ("FAILED", "Failed", 1)],
)
def test_k8s_submit_creates_a_valid_rayjob_and_follows_it(
    fake_k8s, crd_validator, run_config, tmp_path, capsys, job_status, deployment, code
):
    cfg = run_config(
        name="Llama_CPT.v2",
        scaling__num_workers=4,
        scaling__use_gpu=True,
        train__global_batch_size=16,
    )
    path = write_config(tmp_path / "cpt.yaml", cfg)
    final = {"jobDeploymentStatus": deployment, "jobStatus": job_status}
    api = submit.kube_api()
    kuberay = threading.Thread(target=play_kuberay, args=(api, "cpt-one", "ml", RUNNING + [final]))
    kuberay.start()
    argv = ["submit", str(path), "--k8s", "--name", "cpt-one", "-n", "ml"]
    argv += ["--image", "registry.example/raycpt:1.2", "--s3-secret", "s3-keys"]
    rc = cli.main(argv)
    kuberay.join(timeout=30)
    out, err = capsys.readouterr()
    assert rc == code, out + err

    # the watcher reported each step, in order
    lines = [line for line in out.splitlines() if line.startswith("RayJob: ")]
    assert lines == [
        "RayJob: New, job -",
        "RayJob: Initializing, job -",
        "RayJob: Running, job PENDING",
        "RayJob: Running, job RUNNING (cpt-head:8265)",
        f"RayJob: {deployment}, job {job_status} (cpt-head:8265)",
    ]

    # the objects the API server received
    (rayjob,) = fake_k8s.bodies("rayjobs")
    (config_map,) = fake_k8s.bodies("configmaps")
    crd_validator.validate(rayjob)
    assert kuberay_job_violations(rayjob) == []
    for role, template in pod_templates(rayjob).items():
        assert restricted_violations(role, template["spec"]) == []
        for container in template["spec"]["containers"]:
            assert resource_violations(role, container.get("resources")) == []
            assert container["image"] == "registry.example/raycpt:1.2"
    kubernetes_validate.validate(config_map, KUBE_VERSION, strict=True)

    # the config travels in the ConfigMap, owned by the RayJob, mounted where the entrypoint reads
    assert config_map["data"]["cpt.yaml"] == path.read_text()
    (owner,) = config_map["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "RayJob",
        "cpt-one",
        fake_k8s.uids["cpt-one"],
    )
    spec = rayjob["spec"]
    assert spec["entrypoint"] == "python ray_jobs/cpt.py --config /etc/raycpt/cpt.yaml"
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mount = next(
        m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == "/etc/raycpt"
    )
    assert volumes[mount["name"]]["configMap"]["name"] == config_map["metadata"]["name"]

    # sized from the run config, shaped by the flags
    (trainer,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert trainer["replicas"] == trainer["maxReplicas"] == 4
    limits = trainer["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    assert trainer["template"]["spec"]["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "s3-keys"}}
    ]
    assert spec["shutdownAfterJobFinishes"] is True
    assert rayjob["metadata"]["annotations"]["raycpt/run"] == "Llama_CPT.v2"


def test_k8s_status_and_stop(fake_k8s, crd_validator, run_config, tmp_path, capsys):
    path = write_config(tmp_path / "cpt.yaml", run_config(name="Llama_CPT.v2"))
    k8s = ["-n", "ml"]
    assert cli.main(["submit", str(path), "--k8s", "--no-wait", "--keep-cluster", *k8s]) == 0
    name = capsys.readouterr().out.strip()
    assert name.startswith("llama-cpt-v2-") and len(name) == len("llama-cpt-v2-") + 6
    (rayjob,) = fake_k8s.bodies("rayjobs")
    crd_validator.validate(rayjob)
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is False

    play_kuberay(submit.kube_api(), name, "ml", RUNNING)
    assert cli.main(["status", "--k8s", name, *k8s]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["jobDeploymentStatus"], status["jobStatus"]) == ("Running", "RUNNING")

    assert cli.main(["stop", "--k8s", name, *k8s]) == 0
    (delete,) = fake_k8s.requests("rayjobs", "DELETE")
    assert delete.name == name
    assert cli.main(["status", "--k8s", name, *k8s]) == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_k8s_name_taken_is_a_clear_error(fake_k8s, run_config, tmp_path, capsys):
    path = write_config(tmp_path / "cpt.yaml", run_config())
    argv = ["submit", str(path), "--k8s", "--no-wait", "--name", "cpt-same"]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 1
    assert "the name is taken" in capsys.readouterr().err
    assert len(fake_k8s.bodies("configmaps")) == 1  # no second ConfigMap


def test_k8s_bad_name_is_refused_before_anything_is_sent(fake_k8s, run_config, tmp_path, capsys):
    path = write_config(tmp_path / "cpt.yaml", run_config())
    assert cli.main(["submit", str(path), "--k8s", "--name", "CPT_1"]) == 1
    assert "RayJob name" in capsys.readouterr().err
    assert fake_k8s.bodies("rayjobs") == []


def test_k8s_without_credentials_says_how_to_fix(run_config, tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path / "cpt.yaml", run_config())
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli.main(["submit", str(path), "--k8s"]) == 1
    assert "KUBECONFIG" in capsys.readouterr().err
