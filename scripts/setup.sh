#!/usr/bin/env bash
# Create .venv and install exaone-cluster with its test tools. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch is pinned to the 2.13 CPU build in pyproject.toml; pip takes it from the local wheel
# cache when one exists, else from PyPI.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# Build our C kernels now (cached under ~/.cache/exaone-cluster/kernels); without a compiler or
# AVX512-BF16 or AVX2 the engine uses PyTorch instead, and this says why.
.venv/bin/python -c "from replicas.kernels import cpu as k
print('CPU kernels: bf16', k.isa() if k.available() else k.unavailable_reason())
print('CPU kernels: AMX', 'ready' if k.amx_available() else k.amx_unavailable_reason())"
