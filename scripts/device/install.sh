#!/usr/bin/env bash
# Step 1: install from the bundle alone. Writes $WORK/env.sh (PY: the interpreter the next steps use; the trimmed
# tritonserver) and $OUT/install.json. On the device the interpreter is the machine's own (torch preinstalled); with MODE=cpu it is
# a fresh venv whose torch comes from this machine's local wheel.
set -euo pipefail
start=$(date +%s)
if [[ "$MODE" == cpu ]]; then
    PY="$WORK/device-venv/bin/python"   # made by device_check.sh --cpu before the step: the stand-in device
else
    PY="$(command -v python3 || command -v python)"
fi
rm -rf "$WORK/bundle"
tar -xJf "$BUNDLE" -C "$WORK"
W="$WORK/bundle/wheels"
# No index from here on: everything comes from the bundle.
"$PY" -m pip install -q --no-index --find-links "$W" -r "$WORK/bundle/requirements.txt"
"$PY" -m pip install -q --no-index --find-links "$W" --no-deps -r "$WORK/bundle/install-nodeps.txt"
"$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e .
cat > "$WORK/env.sh" <<ENV
export PY="$PY"
export SWIFTDIFFUSION_TRITON_ROOT="$WORK/bundle/tritonserver/pytriton/tritonserver"
export PATH="$(dirname "$PY"):\$PATH"
ENV
source "$WORK/env.sh"
"$PY" - <<'PY' | tee "$OUT/install.json"
import json, sys, importlib.metadata as md
import torch
from triton_backend.serving.server import backend_dir, pytriton_root
names = ["torch", "numpy", "diffusers", "transformers", "peft", "tritonclient", "protobuf", "swiftdiffusion"]
info = {n: md.version(n) for n in names}
info |= {"python": sys.version.split()[0], "cuda": torch.cuda.is_available(), "tritonserver": str(pytriton_root())}
info["backend_dir"] = str(backend_dir())
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name(0)
print(json.dumps(info, indent=1))
PY
echo "installed in $(( $(date +%s) - start )) s"
