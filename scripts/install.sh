#!/usr/bin/env bash
# Install slimtron and its dependencies on a fresh machine. torch goes first, pinned, so that
# nothing below pulls a multi-GB CUDA build on a CPU machine; on a GPU machine with torch already
# installed it is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==${SLIMTRON_TORCH_VERSION:-2.13.0}"
fi
$PY -m pip install -q numpy "pybind11>=2.10" setuptools wheel
$PY -m pip install -q --no-build-isolation -e ".[test]"
