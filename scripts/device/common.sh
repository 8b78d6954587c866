# Sourced by every step of scripts/device_check.sh. DEVPY: the machine's own Python (on the device the python3 that
# holds torch; in the --cpu rehearsal the stand-in venv). Steps after install also source $WORK/env.sh (PY: ours).
if [[ "$MODE" == cpu ]]; then
    DEVPY="$WORK/device-venv/bin/python"
else
    DEVPY="$(command -v python3 || command -v python)"
fi
STUB_DIR="$WORK/bundle/tritonserver/pytriton/tritonserver/python_backend_stubs"
