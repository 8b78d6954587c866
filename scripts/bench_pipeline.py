"""Latency and throughput of txt2img through Triton vs. in-process diffusers, measured side by side in one run.

    python scripts/bench_pipeline.py [--model-dir DIR | --arch sdxl] [--steps 4] [--size 64] [--repeats 30]
                                     [--latency-only] [--out results/]

1. one request, in-process diffusers (``StableDiffusionPipeline``, or ``StableDiffusionXLPipeline`` for an SDXL
   model directory) vs. ``txt2img`` over gRPC (default repository: the UNet with every core in denoise's process,
   batch-2 CFG), measured in turns (alternating blocks), so a slow stretch of a shared machine falls on both;
2. batch-2 CFG vs. latent parallelism on two unet instances (a rendered copy of the repository);
3. throughput and p50/p99 at concurrency 1, 2, 4, 8 with step-level batching on vs. off (dynamic batching
   removed from unet's config in a rendered copy; denoise's local UNet batches as that config says).
Prints a Markdown table and writes JSON under --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from swiftdiffusion_client import Client, GenerationRequest

from triton_backend.paths import default_model_dir
from triton_backend.serving.server import TritonServer, render_repository
from triton_backend.tools.bench import timed, write_results
from triton_backend.tools.default_model import write_default_model


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def in_process(model_dir: Path, req: GenerationRequest) -> Callable[[], object]:
    """One call of the matching diffusers pipeline, loaded in this process (all threads)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from triton_backend.model_info import ModelInfo

    if ModelInfo.read(model_dir).is_sdxl:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir), add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(model_dir), safety_checker=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    return lambda: pipe(
        req.prompt,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale,
        height=req.height,
        width=req.width,
        generator=torch.Generator().manual_seed(req.seed),
        output_type="np",
    )


def in_turns(runs: list[Callable[[], object]], repeats: int, rounds: int = 6) -> list[list[float]]:
    """Seconds per call of each of ``runs``, ``repeats`` each after 3 warm-ups, measured in ``rounds`` alternating
    blocks: a slow stretch of a shared machine falls on every side, not on whichever ran then.
    """
    for run in runs:
        timed(run, 0, warmup=3)
    times: list[list[float]] = [[] for _ in runs]
    for r in range(rounds):
        block = repeats * (r + 1) // rounds - repeats * r // rounds
        for run, out in zip(runs, times, strict=True):
            out += timed(run, block, warmup=0)
    return times


def sequential(url: str, req: GenerationRequest, repeats: int) -> list[float]:
    with Client(url) as c:
        return timed(lambda: c.generate(req), repeats, warmup=3)


def load(url: str, req: GenerationRequest, concurrency: int, total: int) -> dict[str, float]:
    clients = [Client(url) for _ in range(concurrency)]
    latencies: list[float] = []

    def worker(k: int) -> None:
        for i in range(k, total, concurrency):
            r = GenerationRequest(**{**req.__dict__, "seed": i})
            start = time.perf_counter()
            clients[k].generate(r)
            latencies.append(time.perf_counter() - start)

    sequential(url, req, 0)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    wall = time.perf_counter() - start
    for c in clients:
        c.close()
    return {"images_per_s": total / wall, "p50_s": pct(latencies, 50), "p99_s": pct(latencies, 99)}


def print_one_request(model_dir: Path, req: GenerationRequest, repeats: int, rows: list) -> None:
    """The one-request table: ``rows`` of (configuration, median s, p95 s); the first row is diffusers."""
    print(
        f"\n## One request ({model_dir}: {req.steps} steps, {req.width}x{req.height}, guidance {req.guidance_scale}), "
        f"median of {repeats}\n"
    )
    print("| configuration | median s | p95 s | vs diffusers |\n|---|---|---|---|")
    for name, med, p95 in rows:
        print(f"| {name} | {med:.4f} | {p95:.4f} | {med / rows[0][1]:.2f}x |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"], help="default model to use without --model-dir")
    ap.add_argument("--preset", default="tiny", help="default-model preset (tiny, cpu; sd15 for sd1)")
    ap.add_argument("--latency-only", action="store_true", help="only part 1 (one request, Triton vs diffusers)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--load-requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--out", default="results")
    args = ap.parse_args()

    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        model_dir = write_default_model(default_model_dir(args.arch, args.preset), preset=args.preset, arch=args.arch)
    req = GenerationRequest(
        prompt="a photo of an astronaut riding a horse",
        seed=0,
        steps=args.steps,
        guidance_scale=7.5,
        height=args.size,
        width=args.size,
        scheduler="default",
    )
    results: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "model_dir": str(model_dir),
        "request": req.__dict__,
    }
    rows = []

    diffusers_call = in_process(model_dir, req)
    with TritonServer(model_dir=model_dir) as server, Client(server.grpc_url) as client:
        ref, b2 = in_turns([diffusers_call, lambda: client.generate(req)], args.repeats)
        results["diffusers_in_process_s"] = statistics.median(ref)
        rows.append(("diffusers in-process (1 process, all threads)", statistics.median(ref), pct(ref, 95)))
        results["triton_batch2_cfg_s"] = statistics.median(b2)
        rows.append(("txt2img, batch-2 CFG (the UNet in denoise, all threads)", statistics.median(b2), pct(b2, 95)))
        if args.latency_only:
            print_one_request(model_dir, req, args.repeats, rows)
            print(f"\nwrote {write_results(args.out, 'bench_pipeline_latency', results)}")
            return 0
        results["load_batching_on"] = {c: load(server.grpc_url, req, c, args.load_requests) for c in (1, 2, 4, 8)}

    two_instances = render_repository({"unet": [("count: 1 kind: KIND_CPU", "count: 2 kind: KIND_CPU")]})
    no_batching = render_repository({"unet": [("dynamic_batching { max_queue_delay_microseconds: 0 }", "")]})

    with TritonServer(model_dir=model_dir, model_repository=two_instances) as server:
        lp = sequential(server.grpc_url, req, args.repeats)
        results["triton_latent_parallel_s"] = statistics.median(lp)
        rows.append(("txt2img, latent parallel (2 unet instances, cores split)", statistics.median(lp), pct(lp, 95)))

    with TritonServer(model_dir=model_dir, model_repository=no_batching) as server:
        results["load_batching_off"] = {c: load(server.grpc_url, req, c, args.load_requests) for c in (1, 2, 4, 8)}

    print_one_request(model_dir, req, args.repeats, rows)
    print(
        f"\nlatent parallel / batch-2 CFG latency ratio: "
        f"{results['triton_latent_parallel_s'] / results['triton_batch2_cfg_s']:.2f}"
    )
    print(f"\n## Load ({args.load_requests} requests per level), step-level batching on vs off\n")
    print(
        "| concurrency | on: img/s | on: p50 s | on: p99 s | off: img/s | off: p50 s | off: p99 s | throughput on/off |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for c in (1, 2, 4, 8):
        on, off = results["load_batching_on"][c], results["load_batching_off"][c]
        print(
            f"| {c} | {on['images_per_s']:.2f} | {on['p50_s']:.3f} | {on['p99_s']:.3f} | {off['images_per_s']:.2f} "
            f"| {off['p50_s']:.3f} | {off['p99_s']:.3f} | {on['images_per_s'] / off['images_per_s']:.2f}x |"
        )
    print(f"\nwrote {write_results(args.out, 'bench_pipeline', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
