"""ControlNet-as-a-Service vs. the sequential diffusers ControlNet pipeline, measured side by side in one run.

    python scripts/bench_controlnet.py [--model-dir DIR] [--steps 8] [--size 64] [--repeats 15] [--out results/]

Median latency of txt2img with 0, 1, 2 and 3 ControlNets on one server, and of the same work in-process with
``StableDiffusionControlNetPipeline`` (``MultiControlNetModel`` for several; ``StableDiffusionPipeline`` for 0).
Prints the table, the added latency per ControlNet for both, and their ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from swiftdiffusion_client import Client, GenerationRequest

from triton_backend.paths import default_model_dir
from triton_backend.serving.server import TritonServer
from triton_backend.tools.bench import summary, timed, write_results
from triton_backend.tools.default_model import write_default_model
from triton_backend.tools.workload import synthetic_hints

NAMES = ("edges", "depth", "edges")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="results")
    args = ap.parse_args()
    model_dir = Path(args.model_dir) if args.model_dir else write_default_model(default_model_dir())

    def request(n: int) -> GenerationRequest:
        return GenerationRequest(
            prompt="a photo of a cat",
            steps=args.steps,
            height=args.size,
            width=args.size,
            controlnet_names=NAMES[:n],
            controlnet_images=synthetic_hints(n, args.size),
        )

    results: dict = {"steps": args.steps, "size": args.size, "ours": {}, "diffusers": {}}
    with TritonServer(model_dir=model_dir) as server, Client(server.grpc_url) as c:
        for n in range(4):
            results["ours"][n] = summary(timed(lambda n=n: c.generate(request(n)), args.repeats))

    from diffusers import (
        ControlNetModel,
        MultiControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )
    from PIL import Image

    base = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    base.set_progress_bar_config(disable=True)
    nets = {n: ControlNetModel.from_pretrained(str(model_dir / "controlnets" / n)) for n in set(NAMES)}
    for n in range(4):
        req = request(n)
        if n == 0:
            pipe, extra = base, {}
        else:
            cn = [nets[name] for name in NAMES[:n]]
            pipe = StableDiffusionControlNetPipeline(
                **base.components, controlnet=cn[0] if n == 1 else MultiControlNetModel(cn)
            )
            pipe.set_progress_bar_config(disable=True)
            images = [Image.fromarray(h) for h in req.controlnet_images]
            extra = {"image": images[0] if n == 1 else images}

        def run(pipe=pipe, extra=extra) -> None:
            pipe(
                "a photo of a cat",
                num_inference_steps=args.steps,
                height=args.size,
                width=args.size,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
                **extra,
            )

        results["diffusers"][n] = summary(timed(run, args.repeats))

    print(f"\n## ControlNets, {args.steps} steps, {args.size}x{args.size}, median of {args.repeats}\n")
    print("| ControlNets | SwiftDiffusion s | diffusers (sequential) s | SD added | diffusers added | ratio |")
    print("|---|---|---|---|---|---|")
    ours0, ref0 = results["ours"][0]["median_s"], results["diffusers"][0]["median_s"]
    for n in range(4):
        ours, ref = results["ours"][n]["median_s"], results["diffusers"][n]["median_s"]
        print(f"| {n} | {ours:.4f} | {ref:.4f} | {ours - ours0:+.4f} | {ref - ref0:+.4f} | {ref / ours:.2f}x |")
    print(f"\nwrote {write_results(args.out, 'bench_controlnet', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
