#!/usr/bin/env bash
# Step 1: what the machine is, before anything is installed; unpacks the bundle. Writes $RESULTS/preflight.json.
set -uo pipefail
source scripts/device/common.sh
rm -rf "$WORK/bundle"
tar -xJf "$BUNDLE" -C "$WORK" || { echo "error: cannot unpack $BUNDLE"; exit 1; }
"$DEVPY" scripts/device/preflight.py "$WORK/bundle" | tee "$RESULTS/preflight.json"
