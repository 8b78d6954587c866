#!/usr/bin/env bash
# Step 5: ours against the baseline, one request at a time, SD1.5-size in fp16 (written by the server step), with
# per-step milliseconds of the unet passes (traced, synchronized); then one load rate if time is left. Each cell
# is written to $RESULTS/bench/cells/ as it is measured. Sizing: see docs/gpu.md "Time".
set -uo pipefail
source scripts/device/common.sh
source "$WORK/env.sh"
CELLS="0C/0L,1C/0L,3C/0L,0C/1L,2C/2L"
# Start nothing new after this (seconds from the start): the cell or rate in progress and the servers' stop fit in
# the rest (at SD1.5 size the longest cell, 3C/0L, is 8 requests of ~2 s).
DEADLINE=$((${STEP_LIMIT_S:-140} - 35))
if [[ "$MODE" == cuda ]]; then
    "$PY" scripts/benchmark.py --preset sd15 --model-dtype float16 --device cuda --dtype float16 --steps 20 \
        --size 512 --repeats 3 --matrix-rounds 1 --cells "$CELLS" --step-times --rates 1 --requests-per-rate 12 \
        --capacity-requests 3 --deadline-s "$DEADLINE" --out "$RESULTS/bench"
else
    "$PY" scripts/benchmark.py --preset tiny --layout split --steps 4 --repeats 2 --matrix-rounds 1 --cells "$CELLS" \
        --step-times --rates 2 --requests-per-rate 6 --capacity-requests 2 --deadline-s "$DEADLINE" \
        --out "$RESULTS/bench"
fi
