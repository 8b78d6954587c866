"""LoRA costs, measured side by side in one run: patch/restore cycles, conversion, and end-to-end latency.

    python scripts/bench_lora.py [--model-dir DIR] [--steps 20] [--repeats 15] [--cycles 1000] [--out results/]

1. in-process: ``--cycles`` patch/restore cycles of a two-LoRA set on the UNet; time per patch and per restore;
   the UNet must be bit-identical to the original afterwards;
2. through Triton (one server): txt2img median latency without LoRAs, with 2 LoRAs cached (BAL, default bound),
   with 2 LoRAs cold (the files are touched before every request, so each request converts them again) under BAL
   and with k = 0 (loading on the critical path);
3. in-process diffusers, the stock way: load_lora_weights + set_adapters + fuse_lora, generate, unfuse + unload.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from swiftdiffusion_client import Client, GenerationRequest

from triton_backend.bench import timed, write_results
from triton_backend.config import StageConfig
from triton_backend.default_model import write_default_model
from triton_backend.lora.convert import convert_lora_file
from triton_backend.lora.patch import AdapterRef, WeightPatcher
from triton_backend.lora.store import LoraStore
from triton_backend.paths import default_model_dir
from triton_backend.server import TritonServer

LORAS = [("ink_kohya", 0.8), ("glow_kohya", 0.6)]


def cycles(model_dir: Path, n: int) -> dict[str, float]:
    from triton_backend.text_encoding import TextEncoder
    from triton_backend.unet_step import UNetStep

    cfg = StageConfig.from_params("bench", {"model_dir": str(model_dir)})
    unet, skeleton = UNetStep(cfg), UNetStep(cfg).model
    store = LoraStore(
        root=model_dir / "loras", convert=lambda p: convert_lora_file(p, skeleton, TextEncoder(cfg).model)
    )
    start = time.perf_counter()
    refs = tuple(AdapterRef(name, str(store.get(name).file), s) for name, s in LORAS)
    convert_s = time.perf_counter() - start
    original = {k: v.clone() for k, v in unet.model.state_dict().items()}
    patcher = WeightPatcher(unet.model, "unet")
    patch_t, restore_t = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        patcher.ensure(refs)
        t1 = time.perf_counter()
        patcher.restore()
        restore_t.append(time.perf_counter() - t1)
        patch_t.append(t1 - t0)
    identical = all(torch.equal(original[k], v) for k, v in unet.model.state_dict().items())
    store.close()
    return {
        "cycles": n,
        "convert_two_loras_s": convert_s,
        "patch_median_ms": 1000 * statistics.median(patch_t),
        "restore_median_ms": 1000 * statistics.median(restore_t),
        "bit_identical_after_cycles": identical,
        "patched_layers": len(patcher.pristine),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--out", default="results")
    args = ap.parse_args()
    model_dir = Path(args.model_dir) if args.model_dir else write_default_model(default_model_dir())
    base = GenerationRequest(prompt="a photo of an astronaut riding a horse", steps=args.steps, scheduler="ddim")
    with_loras = GenerationRequest(
        **{**base.__dict__, "lora_names": tuple(n for n, _ in LORAS), "lora_scales": tuple(s for _, s in LORAS)}
    )
    k0 = GenerationRequest(**{**with_loras.__dict__, "lora_bound_k": 0})
    results: dict = {"steps": args.steps, "loras": LORAS, "cycles": cycles(model_dir, args.cycles)}

    def touch() -> None:
        for name, _ in LORAS:
            os.utime(model_dir / "loras" / f"{name}.safetensors")

    rows = {}
    with TritonServer(model_dir=model_dir) as server, Client(server.grpc_url) as c:
        rows["triton: no LoRA"] = timed(lambda: c.generate(base), args.repeats)
        rows["triton: 2 LoRAs cached, BAL (k=auto)"] = timed(lambda: c.generate(with_loras), args.repeats)
        landed = []
        rows["triton: 2 LoRAs cold, BAL (k=auto)"] = timed(
            lambda: (touch(), landed.append(c.run(with_loras).lora_landed_step)), args.repeats
        )
        rows["triton: 2 LoRAs cold, k=0 (sync load)"] = timed(lambda: (touch(), c.generate(k0)), args.repeats)
        results["cold_bal_landed_steps"] = landed

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def run_pipe() -> None:
        pipe(base.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0), output_type="np")

    def run_stock() -> None:
        for name, _ in LORAS:
            pipe.load_lora_weights(str(model_dir / "loras" / f"{name}.safetensors"), adapter_name=name)
        pipe.set_adapters([n for n, _ in LORAS], adapter_weights=[s for _, s in LORAS])
        pipe.fuse_lora()
        run_pipe()
        pipe.unfuse_lora()
        pipe.unload_lora_weights()

    rows["diffusers: no LoRA"] = timed(run_pipe, args.repeats)
    rows["diffusers: 2 LoRAs, load+fuse per request"] = timed(run_stock, args.repeats)

    results["latency_median_s"] = {k: statistics.median(v) for k, v in rows.items()}
    cyc = results["cycles"]
    print(f"\n## Patch/restore ({cyc['cycles']} cycles, {cyc['patched_layers']} layers, 2 LoRAs)\n")
    print(
        f"patch {cyc['patch_median_ms']:.2f} ms, restore {cyc['restore_median_ms']:.2f} ms (medians); "
        f"bit-identical afterwards: {cyc['bit_identical_after_cycles']}; "
        f"converting both: {cyc['convert_two_loras_s']:.3f} s"
    )
    print(f"\n## Latency, {args.steps} DDIM steps, median of {args.repeats}\n")
    print("| configuration | median s | added by LoRAs |\n|---|---|---|")
    for name, med in results["latency_median_s"].items():
        ref = results["latency_median_s"]["triton: no LoRA" if name.startswith("triton") else "diffusers: no LoRA"]
        print(f"| {name} | {med:.4f} | {med - ref:+.4f} s |")
    print(f"\ncold BAL landing steps: {results['cold_bal_landed_steps']}")
    print(f"wrote {write_results(args.out, 'bench_lora', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
