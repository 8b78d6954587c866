#!/usr/bin/env bash
# The device check (docs/gpu.md): three independent steps, each with its own time limit, each writing its
# results to $OUT as it goes, each followed by a cleanup of every process it started (servers and stubs included),
# even when it hit its limit.
#   install  120 s  unpack the bundle, install its wheels and the project (no index, no build isolation)
#   tests    240 s  integration tests with the stages on GPU 0 (fp32, TF32 off) + fp16 vs diffusers' fp16
#   bench    240 s  the benchmark on the full-size SD1.5 architecture generated here in fp16; a JSON per cell
#
#   bash scripts/device_check.sh [--cpu] [STEP ...]        (default: all three steps, in order)
#
# BUNDLE: the bundle archive (default shared/device_bundle/bundle.tar.xz; scripts/prepare_device_bundle.py).
# OUT: results (default ./device_results): steps.jsonl (one line per step: rc, seconds, timed_out), <step>.log,
#   install.json, tests.xml, server logs, bench/cells/*.json, bench/benchmark.{json,md}.
# --cpu: the CPU rehearsal on a machine without CUDA: a fresh venv whose torch comes from this machine's wheel
#   (standing in for the device's own torch), the bundle built for this Python, the stages on the CPU, the tiny
#   model, shorter runs. Same scripts, limits, result files and cleanup.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=cuda
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; shift; fi
STEPS=("$@")
[[ ${#STEPS[@]} -eq 0 ]] && STEPS=(install tests bench)
export MODE
export OUT="${OUT:-$PWD/device_results}"
export WORK="${WORK:-/tmp/swiftdiffusion-device}"
export BUNDLE="${BUNDLE:-shared/device_bundle/bundle.tar.xz}"
mkdir -p "$OUT" "$WORK"
declare -A LIMIT=([install]=120 [tests]=240 [bench]=240)

if [[ "$MODE" == cpu && ! -x "$WORK/device-venv/bin/python" ]]; then
    # The stand-in for the device's own Python with torch preinstalled (not part of any step's time).
    echo "== cpu rehearsal: a fresh venv with torch stands in for the device =="
    python3 -m venv "$WORK/device-venv" && "$WORK/device-venv/bin/python" -m pip install -q "torch==2.13.0" || exit 1
fi

cleanup() {  # every server and stub a step left: ours run from $WORK (bundle) or carry our shared-memory tag
    pkill -TERM -f "triton_python_backend_stub" 2>/dev/null
    pkill -TERM -f "tritonserver/bin/tritonserver" 2>/dev/null
    sleep 2
    pkill -KILL -f "triton_python_backend_stub" 2>/dev/null
    pkill -KILL -f "tritonserver/bin/tritonserver" 2>/dev/null
    [[ -f "$WORK/env.sh" ]] && (source "$WORK/env.sh" && "$PY" -c "from triton_backend import shm; shm.sweep()") 2>/dev/null
    return 0
}

for step in "${STEPS[@]}"; do
    override="LIMIT_${step^^}"                     # e.g. LIMIT_TESTS=60 to shorten a step
    limit=${!override:-${LIMIT[$step]:-240}}
    echo "== $step (limit ${limit}s, mode $MODE) =="
    start=$(date +%s.%N)
    # setsid: the step and everything it starts form one process group that timeout can signal as a whole.
    timeout --kill-after=10 "$limit" setsid bash "scripts/device/$step.sh" > >(tee "$OUT/$step.log") 2>&1
    rc=$?
    cleanup
    seconds=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
    timed_out=false; [[ $rc -eq 124 || $rc -eq 137 ]] && timed_out=true
    echo "{\"step\": \"$step\", \"mode\": \"$MODE\", \"rc\": $rc, \"seconds\": $seconds, \"timed_out\": $timed_out}" \
        | tee -a "$OUT/steps.jsonl"
done
