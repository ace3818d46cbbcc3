"""The `helm test` pod: rendered as a restricted hook pod, and its check script run against a real
Ray 2.60 dashboard with token authentication."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .k8s_support import env_of, one, resource_violations, restricted_violations


def test_test_pod_is_a_restricted_helm_hook(render):
    pod = one(render(), "Pod")
    annotations = pod["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "test"
    assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"]
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    assert restricted_violations("test pod", spec) == []
    container = spec["containers"][0]
    assert resource_violations("test pod", container["resources"]) == []
    env = env_of(container)
    cluster = one(render(), "RayCluster")["metadata"]["name"]
    assert env["DASHBOARD_URL"]["value"] == f"http://{cluster}-head-svc.raycpt.svc:8265"
    # KubeRay names the generated token Secret after the cluster (utils.CheckName).
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": cluster,
        "key": "auth_token",
    }


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="module")
def ray_dashboard():
    """A real `ray start --head` with token auth, isolated from any other Ray on the machine.

    It runs in its own session and temp dir (RAY_TMPDIR keeps its address file out of /tmp/ray)
    and is stopped by signalling its process group, never with `ray stop`.
    """
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists() or not shutil.which("curl"):
        pytest.skip("needs the ray CLI (ray[default]) and curl")
    token = secrets.token_hex(16)
    gcs, dashboard, client, agent, metrics = _free_ports(5)
    tmp = tempfile.mkdtemp(prefix="rcpt", dir="/tmp")  # short: Ray's socket paths are limited
    env = dict(
        os.environ,
        RAY_TMPDIR=tmp,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
    )
    log = open(os.path.join(tmp, "ray-start.log"), "w")
    proc = subprocess.Popen(
        [
            str(ray_cli),
            "start",
            "--head",
            "--block",
            "--num-cpus=0",
            "--include-dashboard=true",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--metrics-export-port={metrics}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:
            request = urllib.request.Request(
                f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}
            )
            try:
                with urllib.request.urlopen(request, timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("ray start failed:\n" + Path(tmp, "ray-start.log").read_text())
                time.sleep(0.5)
        yield url, token
    finally:
        for sig, wait in ((signal.SIGTERM, 1), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def run_check(render, url: str, token: str | None, version: str) -> subprocess.CompletedProcess:
    container = one(render(), "Pod")["spec"]["containers"][0]
    env = {"PATH": os.environ["PATH"], "DASHBOARD_URL": url, "EXPECTED_RAY_VERSION": version}
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run(
        container["command"], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_check_script_passes_against_a_real_dashboard(render, ray_dashboard):
    import ray

    url, token = ray_dashboard
    container = one(render(), "Pod")["spec"]["containers"][0]
    values_version = env_of(container)["EXPECTED_RAY_VERSION"]["value"]
    assert values_version == ray.__version__, "rayVersion in values.yaml differs from the stack"
    proc = run_check(render, url, token, ray.__version__)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"dashboard answers, Ray {ray.__version__}" in proc.stdout


@pytest.mark.slow
def test_check_script_fails_on_a_version_mismatch(render, ray_dashboard):
    url, token = ray_dashboard
    proc = run_check(render, url, token, "0.0.1")
    assert proc.returncode == 1
    assert "expected ray_version 0.0.1" in proc.stderr
