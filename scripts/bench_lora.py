"""LoRA costs, measured side by side in one run: patch/restore cycles, conversion, and end-to-end latency.

    python scripts/bench_lora.py [--model-dir DIR] [--steps 20] [--repeats 10] [--cycles 1000] [--out results/]

1. in-process: ``--cycles`` patch/restore cycles of a two-LoRA set on the UNet; time per patch and per restore;
   the UNet must be bit-identical to the original afterwards;
2. through Triton: txt2img median latency with no LoRA, one cold LoRA (the file is touched before every request,
   so it is converted again), one warm (cached) LoRA and two cold LoRAs, with the local store and with a store
   slowed down to EMULATE network storage (``lora_store`` = ``tests.fakes:SlowLoraStore`` with ``latency_ms`` and
   ``mbps``, from ``--slow-latency-ms``/``--slow-mbps``);
3. in-process diffusers, the stock way (load_lora_weights + set_adapters + fuse_lora, generate, unfuse + unload),
   with the same emulated delay in front of each load for the slow case.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from swiftdiffusion_client import Client, GenerationRequest

from triton_backend.config import StageConfig
from triton_backend.lora.convert import convert_lora_file, load_skeletons
from triton_backend.lora.patch import AdapterRef, WeightPatcher
from triton_backend.lora.store import LoraStore
from triton_backend.paths import default_model_dir
from triton_backend.serving.repository import Pipeline, render
from triton_backend.serving.server import TritonServer
from triton_backend.tools.bench import timed, write_results
from triton_backend.tools.default_model import write_default_model

LORAS = [("ink_kohya", 0.8), ("glow_kohya", 0.6)]  # for the patch/restore cycles


def cycles(model_dir: Path, n: int) -> dict[str, float]:
    from triton_backend.stages.unet import UNetStep

    params = {"model_dir": str(model_dir)}
    unet = UNetStep(StageConfig.from_params("unet", params))
    skeletons = load_skeletons(StageConfig.from_params("lora_manager", params))
    store = LoraStore(root=model_dir / "loras", convert=lambda p: convert_lora_file(p, skeletons))
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
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--slow-latency-ms", type=float, default=50.0, help="EMULATED storage latency per miss")
    ap.add_argument("--slow-mbps", type=float, default=100.0, help="EMULATED storage bandwidth")
    ap.add_argument("--out", default="results")
    args = ap.parse_args()
    source = Path(args.model_dir) if args.model_dir else write_default_model(default_model_dir())
    work = Path(tempfile.mkdtemp(prefix="swiftdiffusion-bench-lora-"))
    model_dir = work / "model"
    shutil.copytree(source, model_dir)
    # Two UNet-only LoRAs (text-encoder LoRAs wait for their load before step 0 by design; see the README).
    shutil.copy(model_dir / "loras" / "ink_kohya.safetensors", model_dir / "loras" / "ink_copy.safetensors")
    names = ("ink_kohya", "ink_copy")
    results: dict = {"steps": args.steps, "cycles": cycles(model_dir, args.cycles), "latency_median_s": {}}

    def req(n: int) -> GenerationRequest:
        return GenerationRequest(
            prompt="a photo of an astronaut riding a horse", steps=args.steps, scheduler="ddim", lora_names=names[:n]
        )

    def touch(n: int) -> None:  # a changed file is reconverted: every request is a cold load
        for name in names[:n]:
            os.utime(model_dir / "loras" / f"{name}.safetensors")

    # The slow store: tests.fakes:SlowLoraStore (parameter lora_store) waits latency + size / bandwidth per miss.
    slow_store = f"tests.fakes:SlowLoraStore?latency_ms={args.slow_latency_ms}&mbps={args.slow_mbps}"
    pipeline = [Pipeline("txt2img", model_dir)]
    local = render(work / "repository-local", pipeline, stage_prefix="", load_stages=False)
    slow = render(
        work / "repository-slow",
        pipeline,
        stage_prefix="",
        load_stages=False,
        overrides={"lora_manager": {"lora_store": slow_store}},
    )
    rows = {}
    landed: dict[str, list[int]] = {}
    for label, repo in (("local store", local), ("EMULATED slow store", slow)):
        with TritonServer(model_dir=model_dir, model_repository=repo) as server, Client(server.grpc_url) as c:
            rows[f"SwiftDiffusion, {label}: no LoRA"] = timed(lambda: c.generate(req(0)), args.repeats)
            for n, kind in ((1, "cold"), (1, "warm"), (2, "cold")):
                key = f"SwiftDiffusion, {label}: {n} {kind} LoRA{'s' * (n > 1)}"
                steps_landed: list[int] = []

                def one(n=n, kind=kind, steps_landed=steps_landed) -> None:
                    if kind == "cold":
                        touch(n)
                    steps_landed.append(c.run(req(n)).lora_landed_step)

                rows[key] = timed(one, args.repeats)
                landed[key] = steps_landed

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    file_sizes = {n: (model_dir / "loras" / f"{n}.safetensors").stat().st_size for n in names}

    def stock(n: int, slow_storage: bool) -> None:
        for name in names[:n]:
            if slow_storage:  # the same EMULATED storage delay the slow store applies
                time.sleep(args.slow_latency_ms / 1000 + file_sizes[name] * 8 / (args.slow_mbps * 1e6))
            pipe.load_lora_weights(str(model_dir / "loras" / f"{name}.safetensors"), adapter_name=name)
        if n:
            pipe.set_adapters(list(names[:n]))
            pipe.fuse_lora()
        pipe(
            req(n).prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0), output_type="np"
        )
        if n:
            pipe.unfuse_lora()
            pipe.unload_lora_weights()

    for label, slow_storage in (("local store", False), ("EMULATED slow store", True)):
        for n in (0, 1, 2):
            rows[f"diffusers sync load+fuse, {label}: {n} LoRA{'s' * (n != 1)}"] = timed(
                lambda n=n, s=slow_storage: stock(n, s), args.repeats
            )
    shutil.rmtree(work, ignore_errors=True)

    results["latency_median_s"] = {k: statistics.median(v) for k, v in rows.items()}
    results["landed_steps"] = landed
    cyc = results["cycles"]
    print(f"\n## Patch/restore ({cyc['cycles']} cycles, {cyc['patched_layers']} layers, 2 LoRAs)\n")
    print(
        f"patch {cyc['patch_median_ms']:.2f} ms, restore {cyc['restore_median_ms']:.2f} ms (medians); "
        f"bit-identical afterwards: {cyc['bit_identical_after_cycles']}; "
        f"converting both: {cyc['convert_two_loras_s']:.3f} s"
    )
    print(f"\n## Latency, {args.steps} DDIM steps (k = auto = {round(0.4 * args.steps)}), median of {args.repeats}\n")
    print("| configuration | median s | / no LoRA | landed at steps |\n|---|---|---|---|")
    med = results["latency_median_s"]
    for key, value in med.items():
        system, rest = key.split(", ", 1)
        label = rest.split(":")[0]
        base = med[f"{system}, {label}: no LoRA"] if system.startswith("Swift") else med[f"{system}, {label}: 0 LoRAs"]
        steps = sorted(set(landed.get(key, []))) or ""
        print(f"| {key} | {value:.4f} | {value / base:.3f} | {steps} |")
    print(f"wrote {write_results(args.out, 'bench_lora', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
