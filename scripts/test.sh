#!/usr/bin/env bash
# Install (same as demo.sh), lint, and run the whole test suite, integration tests against the real
# tritonserver included. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV="${SWIFTDIFFUSION_VENV:-.venv}"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/mypy"  # files and settings: [tool.mypy] in pyproject.toml
exec "$VENV/bin/python" -m pytest -q "$@"
