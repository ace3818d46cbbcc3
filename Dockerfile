# syntax=docker/dockerfile:1
#
# raycpt GPU image: Ray 2.60.0 on Python 3.11 and CUDA 12.8 (rayproject/ray's
# <ray version>-py<python>-cu<cuda> tag convention), with the project and the dependencies pinned
# in pyproject.toml. Used by every pod of the Helm chart and of k8s/rayjob.yaml.
#
#   docker build -t <registry>/raycpt:0.1.0 .
#
# The -cuXXX rayproject images are built FROM nvidia/cuda:<version>-devel, so nvcc, the CUDA
# headers and g++ are present and DeepSpeed's CUDA ops can be compiled here, without a GPU (the
# target architectures come from TORCH_CUDA_ARCH_LIST). A -cpu base or a CUDA *runtime* base has no
# nvcc: there, set DS_BUILD_OPS=0 and DeepSpeed compiles ops on first use on the GPU nodes.
FROM rayproject/ray:2.60.0-py311-cu128

# torch: the CUDA 12.8 wheel matching the base image, inside pyproject's range (>=2.4,<2.14).
# Installed first, from PyTorch's index, so that pyproject's `torch` requirement is already met
# and pip never swaps in another build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# GPU generations the DeepSpeed ops are compiled for: A100 (8.0), A10/A40 (8.6), L4/L40 (8.9),
# H100/H200 (9.0), B200 (10.0); +PTX keeps newer GPUs working through JIT.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0+PTX"
# Parallel nvcc jobs while compiling the ops (each takes a few GB of RAM).
ARG MAX_JOBS=4

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /home/ray/raycpt

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The project's dependencies, read from pyproject.toml (not a second list kept in sync by hand).
# This layer only rebuilds when pyproject.toml changes.
COPY --chown=1000:100 pyproject.toml ./
# Core dependencies plus the cluster-side extras: LoRA (peft). Not `k8s`: that is the submitter's.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = p['dependencies'] + p['optional-dependencies']['lora']; print('\n'.join(deps))" > /tmp/requirements.txt

# DeepSpeed first, with its ops pre-built against the torch above (hence no build isolation):
# FusedAdam (the GPU optimizer), CPUAdam (ZeRO-Offload) and the flatten/unflatten utils ZeRO uses.
# DS_ACCELERATOR=cuda because the build machine has no GPU and DeepSpeed would otherwise build
# for its CPU accelerator. The version is the one pinned in pyproject.toml. The build fails if the
# ops did not get pre-built (DeepSpeed records them in git_version_info_installed.py; reading that
# file directly avoids importing deepspeed, which would probe for a GPU).
RUN pip install "ninja==1.13.0" "py-cpuinfo==9.0.0" \
 && DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_UTILS=1 \
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS="${MAX_JOBS}" \
    pip install --no-build-isolation "$(grep '^deepspeed' /tmp/requirements.txt)" \
 && pip install -r /tmp/requirements.txt "torch==${TORCH_VERSION}" \
 && python -c "import importlib.util as u, os; d = u.find_spec('deepspeed').submodule_search_locations[0]; g = {}; exec(open(os.path.join(d, 'git_version_info_installed.py')).read(), g); ops = g['installed_ops']; assert g['accelerator_name'] == 'cuda' and all(ops[k] for k in ('fused_adam', 'cpu_adam', 'utils')), ops" \
 && rm /tmp/requirements.txt

# The project itself (its dependencies are already in place) and the job entry points.
COPY --chown=1000:100 README.md ./
COPY --chown=1000:100 src/ src/
RUN pip install --no-deps .
COPY --chown=1000:100 ray_jobs/ ray_jobs/
COPY --chown=1000:100 configs/ configs/

# The rayproject images' non-root `ray` user (uid 1000, gid 100), as the Helm chart expects.
USER 1000:100
