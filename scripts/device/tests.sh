#!/usr/bin/env bash
# Step 4: correctness on CUDA (stages on GPU 0; fp32 with TF32 off against diffusers on the CPU; fp16 against
# diffusers' fp16 on the GPU from the same float32-drawn noise). --maxfail, not -x: one failure must not hide the
# others; -v: each outcome is in tests.log as it happens (tests.xml is written at the end). No plugin of the
# machine's pytest auto-loads (PYTEST_DISABLE_PLUGIN_AUTOLOAD, env.sh).
set -uo pipefail
source scripts/device/common.sh
source "$WORK/env.sh"
export SWIFTDIFFUSION_SERVER_LOG_DIR="$RESULTS/server-logs"
mkdir -p "$SWIFTDIFFUSION_SERVER_LOG_DIR"
[[ "$MODE" == cuda ]] && export SWIFTDIFFUSION_TEST_DEVICE=cuda
T=tests/test_txt2img_integration.py::test_txt2img_equals_diffusers
TESTS=(
    tests/test_cuda_fp16.py                                   # fp16: SD, LoRA, ControlNet, SDXL (CUDA only)
    "$T[7.5-euler]" "$T[7.5-ddim]" "$T[7.5-dpmpp_2m_karras]"  # fp32: three schedulers
    tests/test_controlnet_integration.py::test_one_controlnet_equals_diffusers
    "tests/test_lora_integration.py::test_k0_equals_diffusers_fused[pastel_peft]"
    tests/test_controlnet_integration.py::test_default_layout_controlnets_equal_diffusers_and_the_service
)
"$PY" -m pytest -v -rA --maxfail=5 -p no:cacheprovider --durations=10 --junitxml="$RESULTS/tests.xml" "${TESTS[@]}"
