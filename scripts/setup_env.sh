#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install the project into it
# with the pinned packages of requirements-pinned.txt, building the C++/CUDA extension.
# Sourced by run.sh and test.sh; re-installs only when the inputs changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$py" -m venv "$venv"
fi

# The extension is compiled for these GPU generations (A100 and H100/H200); nvcc is used when
# it is present, so CUDA sources are compile-checked even on machines without a GPU.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
# a C++ or CUDA compile error must fail the set-up (and so CI), never be skipped
export YODA_SPARSE_REQUIRE_EXT="${YODA_SPARSE_REQUIRE_EXT:-1}"

stamp="$venv/.yoda-sparse-installed"
want="$(cat "$root/requirements-pinned.txt" "$root/pyproject.toml" "$root/setup.py" $(ls "$root"/csrc/* 2>/dev/null) | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing pinned requirements (torch 2.14.1, ...) into $venv"
"$venv/bin/python" -m pip install -q --upgrade "pip>=24" "setuptools>=77"
"$venv/bin/python" -m pip install -q -r "$root/requirements-pinned.txt"
echo "[setup] building and installing yoda-sparse (C++/CUDA extension: a few minutes the first time)"
"$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e "$root[metrics,dev]"
echo "$want" > "$stamp"
