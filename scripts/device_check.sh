#!/usr/bin/env bash
# The device check (docs/gpu.md): one command for a lent CUDA machine, done in <= 540 s including every cleanup.
# Steps, most valuable numbers first; each has a time limit, writes its results as it goes, and is followed by a
# cleanup of the processes it started and a pack of everything so far into $OUT:
#   preflight  25 s  nvidia-smi, Python/torch/CUDA, ldd of the stub, /dev/shm, disk; unpacks the bundle
#   install    80 s  beside the machine's Python: a venv that sees only torch's own packages + the bundle's wheels
#   server    110 s  the SD1.5-size model in fp16 (written there), one fp16 1gpu server: load, GPU memory per
#                    process (nvidia-smi --query-compute-apps), one request of each kind
#   tests     140 s  correctness on CUDA: fp16 vs diffusers (SD, LoRA, ControlNet, SDXL), fp32 schedulers,
#                    a service ControlNet, a LoRA, the default layout
#   bench     140 s  SD1.5-size fp16 single requests, ours vs the baseline (0C/0L, 1C/0L, 3C/0L, 0C/1L, 2C/2L) with
#                    per-step ms of the UNet, the residual path and a LoRA switch
#   load      300 s  (not in the default run) one load rate over the adapter trace: a second command if the lease
#                    has time left, on the same warm machine (it needs install's $WORK)
#
#   bash scripts/device_check.sh [--cpu] [STEP ...]        (default: preflight install server tests bench)
#
# BUNDLE: the bundle archive (default shared/device_bundle/bundle.tar.xz: scripts/prepare_device_bundle.py).
# OUT: where results land (default ./device_results, git-ignored): at most 8 files, none in a folder: summary.json,
#   results.tar.gz (every log, server log, JSON and the JUnit XML) and the headline files (preflight.json,
#   install.json, server.json, tests.xml, benchmark.md).
# WORK: scratch (default /tmp/swiftdiffusion-device): the bundle unpacked, the venv, the models, raw results.
# --cpu: the rehearsal on a machine without CUDA: $WORK/device-venv stands in for the device's Python (3.12, torch
#   2.11.0 as there, numpy 2, scipy and pytest plugins), the stages on the CPU, the tiny model. Same scripts,
#   limits, files and cleanup.
#
# Cleanup never goes by process name: every process a step starts carries SWIFTDIFFUSION_CHECK_TAG in its
# environment (servers in sessions of their own too), and the cleanup ends exactly those, by PID.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=cuda
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; shift; fi
STEPS=("$@")
[[ ${#STEPS[@]} -eq 0 ]] && STEPS=(preflight install server tests bench)
export MODE
export OUT="${OUT:-$PWD/device_results}"
export WORK="${WORK:-/tmp/swiftdiffusion-device}"
export BUNDLE="${BUNDLE:-shared/device_bundle/bundle.tar.xz}"
export RESULTS="$WORK/results"
STEP_DIR="${STEP_DIR:-scripts/device}"   # where <step>.sh lives (tests/test_device_check.py points it elsewhere)
mkdir -p "$OUT" "$WORK" "$RESULTS"
declare -A LIMIT=([preflight]=25 [install]=80 [server]=110 [tests]=140 [bench]=140 [load]=300)
TOTAL_S=${TOTAL_S:-540}   # the whole command, cleanups and packing included
KILL_AFTER=3              # seconds between a step's SIGTERM and its SIGKILL
RESERVE=8                 # per step: its cleanup (<= 4 s) and the pack (~1 s), with margin
TAG="device-check-$$-$(date +%s%N)"

if [[ "$MODE" == cpu && ! -x "$WORK/device-venv/bin/python" ]]; then
    # The stand-in for the device's own Python (not part of any step's time): 3.12 with torch 2.11.0 (PyPI's build
    # of it runs on a CPU), numpy 2, scipy built for numpy 2, and auto-loading pytest plugins, as the device has.
    echo "== cpu rehearsal: making the stand-in device interpreter $WORK/device-venv =="
    base=""
    for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12; do
        "$candidate" -c "" 2>/dev/null && base=$candidate && break
    done
    [[ -n "$base" ]] || { echo "error: the rehearsal needs a python3.12 (the device's version)"; exit 1; }
    "$base" -m venv "$WORK/device-venv" &&
        "$WORK/device-venv/bin/python" -m pip install -q "torch==2.11.0" "numpy>=2" scipy pytest pytest-timeout \
            pytest-xdist || exit 1
fi

tagged() {  # PIDs whose environment carries this run's tag
    local p
    for p in /proc/[0-9]*; do
        { tr '\0' '\n' <"$p/environ"; } 2>/dev/null | grep -qxF "SWIFTDIFFUSION_CHECK_TAG=$TAG" && echo "${p#/proc/}"
    done
}

cleanup() {  # end every process of this run that is still there: TERM, then KILL
    local pids
    pids=$(tagged)
    [[ -z "$pids" ]] && return 0
    echo "cleanup: ending $(echo $pids | wc -w) leftover process(es): $(echo $pids)"
    kill -TERM $pids 2>/dev/null
    for _ in 1 2 3 4 5 6; do sleep 0.5; pids=$(tagged); [[ -z "$pids" ]] && break; done
    [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null
    [[ -f "$WORK/env.sh" ]] && (source "$WORK/env.sh" && "$PY" -c "from triton_backend import shm; shm.sweep()") 2>/dev/null
    return 0
}

pack() { python3 scripts/device/pack.py "$RESULTS" "$OUT" || echo "warning: packing the results failed"; }

on_signal() { echo "device check: interrupted"; cleanup; pack; exit 130; }
trap on_signal INT TERM

start_all=$(date +%s)
for step in "${STEPS[@]}"; do
    override="LIMIT_${step^^}"                     # e.g. LIMIT_TESTS=60 to shorten a step
    limit=${!override:-${LIMIT[$step]:-60}}
    left=$(( TOTAL_S - ($(date +%s) - start_all) - KILL_AFTER - RESERVE ))
    (( limit > left )) && limit=$left
    if (( left < 10 )); then
        echo "{\"step\": \"$step\", \"mode\": \"$MODE\", \"skipped\": \"no time left\"}" | tee -a "$RESULTS/steps.jsonl"
        continue
    fi
    echo "== $step (limit ${limit}s, mode $MODE) =="
    start=$(date +%s.%N)
    # timeout runs the step in a process group of its own and signals the whole group at the limit; what left the
    # group (a server in its own session) carries the tag, and the cleanup ends it.
    SWIFTDIFFUSION_CHECK_TAG="$TAG" STEP_LIMIT_S="$limit" timeout --kill-after=$KILL_AFTER "$limit" \
        bash "$STEP_DIR/$step.sh" > >(tee "$RESULTS/$step.log") 2>&1
    rc=$?
    cleanup
    seconds=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
    timed_out=false; [[ $rc -eq 124 || $rc -eq 137 ]] && timed_out=true
    echo "{\"step\": \"$step\", \"mode\": \"$MODE\", \"rc\": $rc, \"seconds\": $seconds, \"limit\": $limit, \"timed_out\": $timed_out}" \
        | tee -a "$RESULTS/steps.jsonl"
    pack
    [[ "$step" == install && $rc -ne 0 ]] && { echo "install failed: the next steps need it"; break; }
done
echo "device check: $(( $(date +%s) - start_all )) s; results in $OUT ($(ls "$OUT" | wc -l) files)"
