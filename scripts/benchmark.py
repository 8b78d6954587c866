"""The benchmark users can trust: SwiftDiffusion vs. the stock-diffusers baseline in Triton, in one run.

    python scripts/benchmark.py [--preset tiny|cpu] [--model-dir DIR] [--steps 8] [--repeats 10]
                                [--trace-rate 2] [--trace-duration 20] [--slo 2.0] [--out results/]

1. the paper's adapter matrix (C ControlNets / L LoRAs): 0C/0L, 1C/0L, 0C/1L, 1C/1L, 3C/0L, 2C/2L, 3C/2L —
   median and p95 latency through ``txt2img`` on both servers, and the ratio;
2. a production-like trace (Poisson arrivals, 0-3 ControlNets and 0-2 LoRAs per request, Zipf popularity over
   distinct adapters so caches matter), replayed open-loop over async gRPC against both: throughput, p50/p99, SLO
   attainment.
Writes ``benchmark.json``, ``benchmark.md`` and ``benchmark.png`` under --out, with machine, preset and settings.
Both servers run one after the other on the same machine (never at once: they would share the CPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from swiftdiffusion_client import Client, GenerationRequest

from triton_backend.paths import baseline_repository_dir, default_model_dir, model_repository_dir
from triton_backend.serving.server import TritonServer, gpu_repository
from triton_backend.tools.bench import machine, summary, timed, write_results
from triton_backend.tools.default_model import write_default_model
from triton_backend.tools.workload import (
    TraceSpec,
    generate_trace,
    materialize_adapters,
    replay,
    save_trace,
    synthetic_hints,
)

MATRIX = [(0, 0), (1, 0), (0, 1), (1, 1), (3, 0), (2, 2), (3, 2)]
CONTROLNETS = ("edges", "depth", "edges")
LORAS = ("ink_kohya", "glow_kohya")


def matrix_request(c: int, lora: int, steps: int, size: int, seed: int = 0) -> GenerationRequest:
    hints = synthetic_hints(c, size)
    return GenerationRequest(
        prompt="a photo of an astronaut riding a horse",
        seed=seed,
        steps=steps,
        height=size,
        width=size,
        controlnet_names=CONTROLNETS[:c],
        controlnet_images=hints,
        lora_names=LORAS[:lora],
    )


def measure(repository: Path, model_dir: Path, args: argparse.Namespace, trace: list[dict]) -> dict:
    out: dict = {"matrix": {}, "trace": None}
    with TritonServer(model_dir=model_dir, model_repository=repository) as server, Client(server.grpc_url) as c:
        for cn, lora in MATRIX:
            req = matrix_request(cn, lora, args.steps, args.size)
            out["matrix"][f"{cn}C/{lora}L"] = summary(timed(lambda req=req: c.generate(req), args.repeats))
            print(f"  {repository.name} {cn}C/{lora}L: {out['matrix'][f'{cn}C/{lora}L']['median_s']:.3f} s", flush=True)
        out["trace"] = asyncio.run(replay(server.grpc_url, trace, args.steps, args.size, args.slo))
    return out


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results["swiftdiffusion"]["matrix"])
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(9, 4))
    for offset, system in ((-0.2, "swiftdiffusion"), (0.2, "baseline")):
        ax.bar(x + offset, [results[system]["matrix"][k]["median_s"] for k in keys], 0.4, label=system)
    ax.set_xticks(x, keys)
    ax.set_ylabel("median latency (s)")
    ax.set_title(f"txt2img latency by adapters ({results['settings']['preset']}, {results['settings']['steps']} steps)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="default-model preset (tiny, cpu); ignored with --model-dir")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"], help="default-model architecture")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=0, help="pixels; 0 = the model's native size")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--trace-rate", type=float, default=2.0)
    ap.add_argument("--trace-duration", type=float, default=20.0)
    ap.add_argument("--slo", type=float, default=2.0, help="latency SLO in seconds for attainment")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: model stages on GPU 0")
    ap.add_argument("--dtype", default="auto", help="stage dtype on GPU (auto = float16)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args()

    source = (
        Path(args.model_dir)
        if args.model_dir
        else write_default_model(default_model_dir(args.arch, args.preset), preset=args.preset, arch=args.arch)
    )
    work = Path(tempfile.mkdtemp(prefix="swiftdiffusion-bench-"))
    model_dir = work / "model"
    shutil.copytree(source, model_dir)  # the trace adds adapters; never touch the source store
    if not args.size:
        import json

        unet = json.loads((model_dir / "unet" / "config.json").read_text())
        vae = json.loads((model_dir / "vae" / "config.json").read_text())
        args.size = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    trace = generate_trace(TraceSpec(rate=args.trace_rate, duration_s=args.trace_duration))
    save_trace(trace, work / "trace.jsonl")
    materialize_adapters(model_dir, trace)
    settings = {**vars(args), "model_dir": str(source), "trace_requests": len(trace)}
    results = {"settings": settings}
    try:
        ours, base = model_repository_dir(), baseline_repository_dir()
        if args.device == "cuda":
            ours, base = gpu_repository(ours, args.dtype), gpu_repository(base, args.dtype)
        results["swiftdiffusion"] = measure(ours, model_dir, args, trace)
        results["baseline"] = measure(base, model_dir, args, trace)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        f"Machine: {machine()['platform']}, {machine()['cpus']} CPUs; preset {args.preset}; {args.steps} steps; "
        f"{args.size}x{args.size}; median of {args.repeats}.",
        "",
        "| adapters | SwiftDiffusion median s | p95 s | baseline median s | p95 s | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for key, ours in results["swiftdiffusion"]["matrix"].items():
        base = results["baseline"]["matrix"][key]
        lines.append(
            f"| {key} | {ours['median_s']:.3f} | {ours['p95_s']:.3f} | {base['median_s']:.3f} | "
            f"{base['p95_s']:.3f} | {base['median_s'] / ours['median_s']:.2f}x |"
        )
    lines += [
        "",
        f"Trace: {len(trace)} requests, Poisson {args.trace_rate}/s over {args.trace_duration:.0f} s, "
        f"SLO {args.slo} s.",
        "",
        "| system | throughput req/s | p50 s | p99 s | SLO attainment | errors |",
        "|---|---|---|---|---|---|",
    ]
    for system in ("swiftdiffusion", "baseline"):
        t = results[system]["trace"]
        lines.append(
            f"| {system} | {t['throughput_rps']:.2f} | {t['p50_s']:.3f} | {t['p99_s']:.3f} | "
            f"{100 * t['slo_attainment']:.0f}% | {t['errors']} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(table + "\n")
    write_results(out, "benchmark", results)
    try:
        chart(results, out / "benchmark.png")
    except ImportError:
        print("matplotlib is not installed: no chart")
    print(f"wrote {out}/benchmark.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
