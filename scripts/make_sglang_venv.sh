#!/usr/bin/env bash
# Makes the optional venv for the SGLang test suite (tests/sglang/) and the SGLang plugin.
#
# SGLang 0.5.23 pins torch 2.14.1 and transformers 5.19, the main dev venv runs torch 2.13 and
# transformers 4.x, so SGLang gets a venv of its own. `pip install sglang` would pull CUDA-only
# packages (sgl-kernel, flashinfer, ...) that do not matter for the algorithm plugin on a CPU
# machine: SGLang is installed with --no-deps, then the plain Python packages its dLLM
# algorithm, ForwardBatch and plugin modules import (see docs/serving.md).
#
# Usage: scripts/make_sglang_venv.sh [VENV_DIR]      (default: <repo>/.venv-sglang)
# Env:   PYTHON                 interpreter for the venv (default: python3.11, else python3)
#        RCD_SGLANG_KERNELS     auto|0|1: build rcd_ext's C++ kernel against torch 2.14.1.
#                               The editable build writes rcd_ext/_C.so into the checkout, which
#                               a second venv of the same checkout (.venv, torch 2.13) also loads;
#                               auto = 1 unless <repo>/.venv exists. With 0 the op runs its
#                               plain-torch reference in this venv (correct, slower).
# Needs about 6 GB of disk (torch 2.14.1's CUDA wheel and its nvidia wheels) and 5-15 minutes.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-sglang}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
KERNELS="${RCD_SGLANG_KERNELS:-auto}"
if [[ "$KERNELS" == auto ]]; then
    if [[ -d "$REPO/.venv" ]]; then KERNELS=0; else KERNELS=1; fi
fi

SGLANG_VERSION=0.5.23
TORCH_VERSION=2.14.1
TRANSFORMERS_VERSION=5.19.0
# What sglang.srt.dllm.algorithm, sglang.srt.model_executor.forward_batch_info and
# sglang.srt.plugins import at module level (found by importing them until nothing is missing).
SGLANG_PLAIN_DEPS=(
    "apache-tvm-ffi==0.1.11" orjson psutil pybase64 requests triton pillow starlette msgspec
    pyzmq IPython aiohttp dill sentencepiece compressed-tensors gguf openai partial-json-parser
    uvicorn fastapi einops
)
# rcd_ext's own runtime and build needs (its pyproject pins transformers < 5 for the main venv,
# hence --no-deps below), and the test runner.
RCD_DEPS=(numpy tqdm accelerate pyyaml setuptools wheel ninja pytest)

free_gb=$(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print int($4 / 1048576)}')
if (( free_gb < 8 )); then
    echo "make_sglang_venv: only ${free_gb} GB free under $(dirname "$VENV") (need about 8)" >&2
    exit 2
fi

echo "== venv $VENV (python: $PYTHON)"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --progress-bar off)
"${PIP[@]}" --upgrade pip

echo "== torch $TORCH_VERSION, transformers $TRANSFORMERS_VERSION, SGLang's plain dependencies"
"${PIP[@]}" "torch==$TORCH_VERSION" torchvision "transformers==$TRANSFORMERS_VERSION" \
    "${SGLANG_PLAIN_DEPS[@]}" "${RCD_DEPS[@]}"

echo "== sglang $SGLANG_VERSION (--no-deps)"
"${PIP[@]}" --no-deps "sglang==$SGLANG_VERSION"

echo "== rcd-ext from $REPO (kernels: $KERNELS)"
if [[ "$KERNELS" == 1 ]]; then
    (cd "$REPO" && "${PIP[@]}" --no-build-isolation --no-deps -e .)
else
    (cd "$REPO" && RCD_EXT_BUILD_KERNELS=0 "${PIP[@]}" --no-build-isolation --no-deps -e .)
fi

echo "== check (from outside the checkout: a stale rcd_ext.egg-info there hides entry points)"
cd "$(mktemp -d)"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md

import torch
import transformers
from sglang.srt.dllm.algorithm import get_algorithm_cls
from sglang.srt.plugins import load_plugins

from rcd_ext import ops

load_plugins()
print("torch", torch.__version__, "transformers", transformers.__version__,
      "sglang", md.version("sglang"), "rcd_ext op backend:", ops.backend("cpu"))
print("RCD algorithm:", get_algorithm_cls("RCD"))
PY
echo "make_sglang_venv: ready. Run: $VENV/bin/python -m pytest -q tests/sglang"
