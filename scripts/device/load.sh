#!/usr/bin/env bash
# Step 6 (not in the default run: a second command, when the lease has time left): one load rate, ours against the
# baseline, over the production-like trace (every adapter warmed up first: ~16 requests per server at SD1.5 size),
# written to $RESULTS/load/.
set -uo pipefail
source scripts/device/common.sh
source "$WORK/env.sh"
if [[ "$MODE" == cuda ]]; then
    "$PY" scripts/benchmark.py --preset sd15 --model-dtype float16 --device cuda --dtype float16 --steps 20 \
        --size 512 --cells none --rates 1 --requests-per-rate 12 --capacity-requests 3 --out "$RESULTS/load"
else
    "$PY" scripts/benchmark.py --preset tiny --layout split --steps 4 --cells none --rates 2 --requests-per-rate 6 \
        --capacity-requests 2 --out "$RESULTS/load"
fi
