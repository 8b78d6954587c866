#!/usr/bin/env bash
# Step 2: install beside, not into, the machine's Python. $WORK/venv is a venv of the machine's interpreter without
# its site-packages; a .pth adds $WORK/torch-view, links to torch and the distributions torch needs (nothing else of
# the machine's: its numpy 2 and what is built against it stay out of sight); the bundle's wheels and the project
# (editable) go into the venv with the machine's pip (--python), from the bundle alone. The machine's environment is
# unchanged (its pip freeze is compared). Writes $WORK/env.sh and $RESULTS/install.json.
set -euo pipefail
source scripts/device/common.sh
start=$(date +%s)
B="$WORK/bundle"
V="$WORK/venv"
before=$("$DEVPY" -m pip freeze 2>/dev/null | sha256sum | cut -c1-16)
rm -rf "$V" "$WORK/torch-view"
"$DEVPY" -m venv --without-pip "$V"
site=$("$V/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
"$DEVPY" scripts/device/torch_view.py "$WORK/torch-view" "$B/requirements.txt" "$B/install-nodeps.txt"
echo "$WORK/torch-view" >"$site/device-torch-view.pth"
pip_into_venv=("$DEVPY" -m pip --python "$V/bin/python" install -q --no-index --find-links "$B/wheels")
"${pip_into_venv[@]}" -r "$B/requirements.txt"
"${pip_into_venv[@]}" --no-deps -r "$B/install-nodeps.txt"
"${pip_into_venv[@]}" --no-build-isolation --no-deps -e .
after=$("$DEVPY" -m pip freeze 2>/dev/null | sha256sum | cut -c1-16)
cat >"$WORK/env.sh" <<ENV
export PY="$V/bin/python"
export SWIFTDIFFUSION_TRITON_ROOT="$B/tritonserver/pytriton/tritonserver"
export PATH="$V/bin:\$PATH"
# last: the machine's own libpython wins where it has one (preflight.json says which is used)
export LD_LIBRARY_PATH="\${LD_LIBRARY_PATH:+\$LD_LIBRARY_PATH:}$B/libpython"
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
export PYTHONNOUSERSITE=1
ENV
source "$WORK/env.sh"
"$PY" - "$before" "$after" <<'PY' | tee "$RESULTS/install.json"
import importlib.metadata as md, json, sys
import torch
from triton_backend.serving.server import backend_dir, pytriton_root
names = ["torch", "numpy", "diffusers", "transformers", "peft", "tritonclient", "protobuf", "swiftdiffusion"]
info = {n: md.version(n) for n in names}
info |= {"python": sys.version.split()[0], "cuda": torch.cuda.is_available(), "tritonserver": str(pytriton_root())}
info["backend_dir"] = str(backend_dir())
info["device_python_unchanged"] = sys.argv[1] == sys.argv[2]
info["scipy_visible"] = __import__("importlib.util").util.find_spec("scipy") is not None
print(json.dumps(info, indent=1))
PY
echo "installed in $(($(date +%s) - start)) s"
