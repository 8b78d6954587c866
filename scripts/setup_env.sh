#!/usr/bin/env bash
# Create the virtual environment and install everything (idempotent). Used by demo.sh, test.sh and CI.
# torch is pinned to the 2.13.0 CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SWIFTDIFFUSION_VENV:-.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  echo ">> creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo ">> installing $TORCH_SPEC"
  "$VENV/bin/pip" install -q "$TORCH_SPEC"
fi
echo ">> installing swiftdiffusion and its dependencies"
"$VENV/bin/pip" install -q -e ".[test]"
