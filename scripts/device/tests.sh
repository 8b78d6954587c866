#!/usr/bin/env bash
# Step 2: the integration tests on the device (stages on GPU 0 in fp32 with TF32 off, references on the CPU),
# then fp16 against diffusers' own fp16 pipeline. --maxfail, not -x: one failure must not hide the others.
set -uo pipefail
source "$WORK/env.sh"
export SWIFTDIFFUSION_SERVER_LOG_DIR="$OUT/server-logs"
TESTS=(tests/test_txt2img_integration.py tests/test_cuda_fp16.py)
if [[ "$MODE" == cuda ]]; then
    export SWIFTDIFFUSION_TEST_DEVICE=cuda
    TESTS+=(tests/test_controlnet_integration.py tests/test_lora_integration.py tests/test_sdxl_integration.py)
    TESTS+=(tests/test_stream_integration.py)
fi
"$PY" -m pytest -q --maxfail=5 -p no:cacheprovider --junitxml="$OUT/tests.xml" "${TESTS[@]}"
