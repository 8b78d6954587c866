#!/usr/bin/env bash
# Step 3: one fp16 GPU server on the SD1.5-size model: load time, GPU memory per process, single requests.
set -uo pipefail
source scripts/device/common.sh
source "$WORK/env.sh"
"$PY" scripts/device/server.py --mode "$MODE" --out "$RESULTS"
