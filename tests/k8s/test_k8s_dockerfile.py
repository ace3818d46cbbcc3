"""The Dockerfile (which no machine here can build): it lints clean, installs what pyproject.toml
pins, and agrees with the chart on user and working directory."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .k8s_support import CHART, K8S_DIR, REPO

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\") if current else stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            current = ""
    return out


def args_defaults() -> dict[str, str]:
    found = {}
    for keyword, rest in instructions():
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            found[name] = value.strip('"')
    return found


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def image_requirements() -> list[str]:
    """What the image installs: the core dependencies and the cluster-side `lora` extra."""
    project = pyproject()["project"]
    return project["dependencies"] + project["optional-dependencies"]["lora"]


def requirements() -> dict[str, Requirement]:
    return {Requirement(r).name.lower(): Requirement(r) for r in image_requirements()}


def base_image() -> re.Match:
    froms = [rest for keyword, rest in instructions() if keyword == "FROM"]
    assert len(froms) == 1, "one stage expected"
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cu\d+)", froms[0])
    assert match, f"FROM {froms[0]} does not follow rayproject/ray:<ray>-py<XY>-cu<NNN>"
    return match


def test_hadolint_passes(hadolint):
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_image_ray_and_python_match_pyproject():
    match = base_image()
    ray = requirements()["ray"]
    pinned = [s.version for s in ray.specifier if s.operator == "=="]
    assert pinned == [match.group(1)], f"pyproject pins {ray}, the image is Ray {match.group(1)}"
    assert {"default", "train", "data"} <= ray.extras
    python = f"{match.group(2)}.{match.group(3)}"
    assert Version(python) in SpecifierSet(pyproject()["project"]["requires-python"])


def test_torch_is_the_base_images_cuda_build_within_pyprojects_range():
    args = args_defaults()
    torch = requirements()["torch"]
    assert Version(args["TORCH_VERSION"]) in torch.specifier, (args["TORCH_VERSION"], str(torch))
    cuda = base_image().group(4)
    assert args["TORCH_INDEX_URL"] == f"https://download.pytorch.org/whl/{cuda}"
    run_lines = " ".join(rest for keyword, rest in instructions() if keyword == "RUN")
    assert '"torch==${TORCH_VERSION}"' in run_lines


def test_dependencies_come_from_pyproject_not_a_second_list():
    runs = [rest for keyword, rest in instructions() if keyword == "RUN"]
    joined = " ".join(runs)
    assert "['dependencies']" in joined and "['optional-dependencies']['lora']" in joined
    assert "pip install -r /tmp/requirements.txt" in joined
    assert "pip install --no-deps ." in joined
    # No pyproject dependency is pinned again by hand (torch comes in through TORCH_VERSION).
    for name in requirements():
        assert not re.search(
            rf"(?<![\w-]){re.escape(name)}(\[[^\]]*\])?[=<>~]=\s*\d", joined, re.I
        ), name


def test_requirement_extraction_runs_on_the_real_pyproject(tmp_path):
    """Run the Dockerfile's own extraction command and the deepspeed pick on pyproject.toml."""
    run = next(r for k, r in instructions() if k == "RUN" and "tomllib" in r)
    python_cmd, _, redirect = run.partition(">")
    assert redirect.strip() == "/tmp/requirements.txt"
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    argv = shlex.split(python_cmd)
    argv[0] = shutil.which("python3") or argv[0]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert lines == image_requirements()
    deepspeed = [line for line in lines if re.match(r"^deepspeed", line)]
    assert deepspeed == [str(requirements()["deepspeed"])]
    assert "==" in deepspeed[0]


def test_deepspeed_ops_are_prebuilt_for_cuda():
    joined = " ".join(rest for keyword, rest in instructions() if keyword == "RUN")
    for flag in (
        "DS_ACCELERATOR=cuda",
        "DS_BUILD_FUSED_ADAM=1",
        "DS_BUILD_CPU_ADAM=1",
        "--no-build-isolation",
        "installed_ops",
    ):
        assert flag in joined
    assert "TORCH_CUDA_ARCH_LIST" in args_defaults()


def test_runs_as_the_chart_user_in_the_chart_working_dir():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    users = [rest for keyword, rest in instructions() if keyword == "USER"]
    security = values["podSecurity"]
    assert users[-1] == f"{security['runAsUser']}:{security['runAsGroup']}"
    workdirs = [rest for keyword, rest in instructions() if keyword == "WORKDIR"]
    assert workdirs[-1] == values["image"]["workingDir"]
    rayjob = yaml.safe_load((K8S_DIR / "rayjob.yaml").read_text())
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["workingDir"] == workdirs[-1]
    for keyword, rest in instructions():
        if keyword == "COPY":
            assert "--chown=1000:100" in rest, rest


# ---------------------------------------------------------------------------------------------
# build context
# ---------------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex on slash paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]"
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = _pattern_regex(line.lstrip("!").strip("/"))
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def copied_sources() -> list[str]:
    sources = []
    for keyword, rest in instructions():
        if keyword == "COPY":
            words = [w for w in rest.split() if not w.startswith("--")]
            sources += [w.rstrip("/") for w in words[:-1]]
    return sources


def test_everything_copied_exists_and_is_in_the_build_context():
    for source in copied_sources():
        path = REPO / source
        assert path.exists(), f"COPY {source}: missing from the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        kept = [f for f in files if not dockerignore_excludes(str(f.relative_to(REPO)))]
        assert kept, f"COPY {source}: everything is excluded by .dockerignore"
    readme = pyproject()["project"]["readme"]
    assert readme in copied_sources(), "setuptools needs the readme pyproject names"
    assert pyproject()["tool"]["setuptools"]["packages"]["find"]["where"] == ["src"]


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        ("pyproject.toml", False),
        ("src/raycpt/config.py", False),
        ("ray_jobs/cpt.py", False),
        ("configs/smoke.yaml", False),
        ("src/raycpt/__pycache__/config.cpython-311.pyc", True),
        (".venv/bin/python", True),
        (".git/HEAD", True),
        ("tests/k8s/conftest.py", True),
        ("helm/raycpt/values.yaml", True),
        ("runs/smoke/checkpoint_000001/model.pt", True),
        ("Dockerfile", True),
    ],
)
def test_dockerignore_keeps_the_context_small(path, excluded):
    assert dockerignore_excludes(path) is excluded
