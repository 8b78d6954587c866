#!/usr/bin/env bash
# Step 5: ours against the baseline, one request at a time, SD1.5-size in fp16 (written by the server step), with
# per-step milliseconds of the unet passes (traced, synchronized). Each cell is written to $RESULTS/bench/cells/ as
# it is measured. The load rate is its own step (load.sh), run only when the lease has time left.
set -uo pipefail
source scripts/device/common.sh
source "$WORK/env.sh"
CELLS="0C/0L,1C/0L,3C/0L,0C/1L,2C/2L"
# Start no cell after this (seconds from the start): the cell in progress and the servers' stop fit in the rest (at
# SD1.5 size the longest cell, 2C/2L with cold LoRA loads, is 8 requests of ~2-3 s).
DEADLINE=$((${STEP_LIMIT_S:-140} - 50))
if [[ "$MODE" == cuda ]]; then
    "$PY" scripts/benchmark.py --preset sd15 --model-dtype float16 --device cuda --dtype float16 --steps 20 \
        --size 512 --repeats 3 --matrix-rounds 1 --cells "$CELLS" --step-times --matrix-only \
        --deadline-s "$DEADLINE" --out "$RESULTS/bench"
else
    "$PY" scripts/benchmark.py --preset tiny --layout split --steps 4 --repeats 2 --matrix-rounds 1 --cells "$CELLS" \
        --step-times --matrix-only --deadline-s "$DEADLINE" --out "$RESULTS/bench"
fi
