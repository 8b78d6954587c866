#!/usr/bin/env bash
# Step 3: the benchmark. On the device: the full-size SD1.5 architecture with random weights, written here in
# fp16 (never copied; the trace's adapters are links), fp16 stages on GPU 0. Each measured cell is written to
# $OUT/bench/cells/ at once, so a run cut short by the limit keeps what it measured.
set -uo pipefail
source "$WORK/env.sh"
if [[ "$MODE" == cuda ]]; then
    "$PY" scripts/benchmark.py --preset sd15 --model-dtype float16 --device cuda --dtype float16 --steps 20 \
        --size 512 --repeats 3 --requests-per-rate 30 --capacity-requests 6 --out "$OUT/bench"
else
    "$PY" scripts/benchmark.py --preset tiny --steps 4 --repeats 2 --requests-per-rate 6 --capacity-requests 4 \
        --rates 2,4 --out "$OUT/bench"
fi
