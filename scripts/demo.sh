#!/usr/bin/env bash
# The main job, from a fresh clone: install, generate the default model if missing, start the bundled
# tritonserver on a repository rendered from model_repository/ for it, send one gRPC txt2img request, write
# swiftdiffusion.png, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${SWIFTDIFFUSION_VENV:-.venv}/bin/swiftdiffusion" demo "$@"
