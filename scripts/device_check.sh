#!/usr/bin/env bash
# One prepared check for a CUDA machine without a package registry (its own torch is preinstalled):
#   1. install swiftdiffusion and the missing wheels from $WHEELS (default: shared/wheels, copied alongside);
#   2. run the test suite with the model stages on GPU 0 (fp32, compared with diffusers on the CPU);
#   3. run the benchmark on the full-size SD1.5 architecture (random weights) in fp16 on GPU 0;
#   4. write everything to $OUT (default: ./device_results).
# Budget: ~8 minutes. Prepare the wheels on a machine with a registry (keep the folder under 64 MiB):
#   pip download --only-binary=:all: --no-deps -d shared/wheels "numpy<2" "diffusers<0.43" \
#       "transformers>=5.12,<5.24" peft safetensors "tritonclient[grpc]==2.51.0" nvidia-pytriton==0.7.0 \
#       grpcio protobuf huggingface-hub tokenizers regex pillow tqdm pytest matplotlib
#   (nvidia-pytriton is the largest: if the folder must stay under 64 MiB, copy it separately)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_results}"
WHEELS="${WHEELS:-shared/wheels}"
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
start=$(date +%s)
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
pip install -q --no-index --find-links "$WHEELS" -e ".[test]" || pip install -q --no-index --find-links "$WHEELS" --no-deps -e .
nvidia-smi --query-gpu=name,memory.total --format=csv || true

echo "== tests on CUDA =="
SWIFTDIFFUSION_TEST_DEVICE=cuda timeout 240 python -m pytest -q -x tests/test_txt2img_integration.py \
    tests/test_controlnet_integration.py tests/test_lora_integration.py tests/test_latent_parallel.py \
    tests/test_sdxl_integration.py \
    --junitxml="$OUT/tests.xml" || echo "TESTS FAILED (rc $?)"

echo "== benchmark: SD1.5 architecture, fp16, GPU 0: adapter matrix + rate sweep (0.5x..1.5x baseline capacity) =="
timeout 240 python scripts/benchmark.py --preset sd15 --device cuda --dtype float16 --steps 20 --size 512 \
    --repeats 5 --requests-per-rate 60 --out "$OUT" || echo "BENCHMARK FAILED (rc $?)"
echo "elapsed $(( $(date +%s) - start )) s"
