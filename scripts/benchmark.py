"""The benchmark users can trust: SwiftDiffusion vs. the stock-diffusers baseline in Triton, in one run.

    python scripts/benchmark.py [--preset tiny|cpu] [--arch sd1|sdxl] [--model-dir DIR] [--steps 8] [--repeats 10]
                                [--matrix-rounds 3] [--rates 1,2,3] [--requests-per-rate 60] [--slo SECONDS]
                                [--out results/]

1. the paper's adapter matrix (C ControlNets / L LoRAs): 0C/0L, 1C/0L, 0C/1L, 1C/1L, 3C/0L, 2C/2L, 3C/2L —
   median and p95 latency through ``txt2img`` on both servers over ``--matrix-rounds`` blocks of ``--repeats``
   requests each, the systems alternating block by block, and the ratio; then the same for img2img at strength 0.5
   (0C/0L, 1C/1L, 2C/2L, and inpainting; the baseline's stock img2img and inpainting pipelines) and for
   ``NUM_IMAGES`` = 4 (the baseline's ``num_images_per_prompt=4``);
2. a rate sweep over a production-like trace (Poisson arrivals, 0-3 ControlNets and 0-2 LoRAs per request, Zipf
   popularity over distinct adapters so caches matter), replayed open-loop over async gRPC against both, the same
   requests at every rate: throughput, goodput, p50/p99 and SLO attainment per rate, and **throughput at SLO** = the
   highest rate at which >= 90 % of the requests met the SLO. Every request carries ``DEADLINE_MS`` = the SLO (the
   baseline ignores it). Without ``--rates`` the rates are 0.25x .. 1.25x the baseline's capacity, measured first
   (1 / its mean service time over the trace's requests, one at a time); without ``--slo`` the SLO is 2.5x that
   mean service time;
3. resident memory (RSS) per stage process of each server after the sweep.
Writes ``benchmark.json``, ``benchmark.md`` and ``benchmark.png`` (latency matrix; attainment vs rate) under --out,
with machine, preset and settings. Both servers are up for the whole run and take turns, never working at once (they
would share the CPUs): each block of a matrix cell and each rate point runs on the baseline, then at once on ours,
so that a noisy stretch of a shared machine hits both alike. The baseline's capacity sets the rates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from swiftdiffusion_client import Client, GenerationRequest

from triton_backend.paths import baseline_repository_dir, default_model_dir
from triton_backend.serving.events import TRACE_ENV
from triton_backend.serving.repository import Layout, Pipeline, render
from triton_backend.serving.server import TritonServer, gpu_repository
from triton_backend.tools.bench import machine, step_times, summary, timed, write_results
from triton_backend.tools.default_model import write_default_model
from triton_backend.tools.workload import (
    TraceSpec,
    generate_trace,
    materialize_adapters,
    replay,
    synthetic_hints,
    to_request,
)

MATRIX = [(0, 0), (1, 0), (0, 1), (1, 1), (3, 0), (2, 2), (3, 2)]
#: img2img cells: (ControlNets, LoRAs, inpainting), at strength 0.5.
IMG2IMG_MATRIX = [(0, 0, False), (1, 1, False), (2, 2, False), (0, 0, True)]
#: Images per request of the NUM_IMAGES cell (against the 0C/0L cell's one).
MANY_IMAGES = 4
#: Default sweep, as fractions of the baseline's capacity: from well below it (where the baseline itself meets the
#: SLO, so its throughput at SLO is a number) to above it.
RATE_FACTORS = (0.25, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25)
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


def img2img_request(c: int, lora: int, inpainting: bool, steps: int, size: int) -> GenerationRequest:
    """The matrix request with an init image (a smooth picture) at strength 0.5, and a centre mask to inpaint."""
    yy, xx = np.indices((size, size)) / size
    image = np.stack([200 * xx + 30, 160 * yy + 50, 120 * (1 - xx * yy) + 60], axis=-1).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return dataclasses.replace(
        matrix_request(c, lora, steps, size), init_image=image, strength=0.5, mask_image=mask if inpainting else None
    )


def cells(args: argparse.Namespace) -> list[tuple[str, GenerationRequest]]:
    """Every latency cell: the adapter matrix, img2img, several images."""
    out = [(f"{c}C/{lora}L", matrix_request(c, lora, args.steps, args.size)) for c, lora in MATRIX]
    for c, lora, inpainting in IMG2IMG_MATRIX:
        label = f"img2img{' inpaint' if inpainting else ''} {c}C/{lora}L"
        out.append((label, img2img_request(c, lora, inpainting, args.steps, args.size)))
    many = dataclasses.replace(matrix_request(0, 0, args.steps, args.size), num_images=MANY_IMAGES)
    out.append((f"n={MANY_IMAGES} 0C/0L", many))
    if args.cells == "none":  # (the rate sweep alone)
        return []
    chosen = [c.strip() for c in args.cells.split(",") if c.strip()] if args.cells else []
    unknown = set(chosen) - {label for label, _ in out}
    if unknown:
        raise SystemExit(f"--cells: unknown {sorted(unknown)}; choose from {[label for label, _ in out]}")
    return [cell for cell in out if not chosen or cell[0] in chosen]


def out_of_time(args: argparse.Namespace, what: str) -> bool:
    """``--deadline-s`` has passed (since the benchmark started): ``what`` is skipped, and said so."""
    if args.deadline_s and time.monotonic() - args.started > args.deadline_s:
        print(f"--deadline-s {args.deadline_s:g} passed: {what} skipped", flush=True)
        return True
    return False


def send(system: str, client: Client, request: GenerationRequest) -> object:
    """One request: ours through the public model it is for (``txt2img`` / ``img2img``), the baseline's through its
    one model, which takes both contracts.
    """
    if system == "baseline":
        return client.infer_raw(request.to_tensors())
    return client.run(request)


def record(args: argparse.Namespace, system: str, cell: str, data: dict) -> None:
    """Write one measured cell at once (``<out>/cells/<system>-<cell>.json``): a run cut short keeps what it got."""
    cells = Path(args.out) / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    (cells / f"{system}-{cell}.json").write_text(json.dumps(data, indent=1, default=str))


def measure(repositories: dict[str, Path], model_dir: Path, args: argparse.Namespace) -> tuple[dict, list[float]]:
    """Both systems, interleaved: each matrix cell and each rate point runs on the first server, then at once on the
    second, so that both see the same minutes of this shared machine (two servers are up, one works at a time).
    Order: matrix, mean service time over trace requests (one at a time), the sweep (rates from the first system's
    service time: the baseline's), then memory per stage. Returns the results by system and the rates.
    """
    results: dict = {}
    trace_file = Path(args.out) / "trace.jsonl"
    trace_file.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(
                TritonServer(
                    model_dir=model_dir,
                    model_repository=repository,
                    env={TRACE_ENV: str(trace_file)} if args.step_times and name == "swiftdiffusion" else {},
                )
            )
            for name, repository in repositories.items()
        }
        clients = {name: stack.enter_context(Client(server.grpc_url)) for name, server in servers.items()}
        for name, server in servers.items():
            results[name] = {"matrix": {}, "sweep": {}, "memory_idle": server.memory()}
        for cell, req in cells(args):
            if out_of_time(args, f"cell {cell} and after"):
                break
            since = time.time()
            times: dict[str, list[float]] = {name: [] for name in clients}
            for turn in range(args.matrix_rounds):  # blocks of --repeats, alternating between the systems
                for name, c in clients.items():
                    call = lambda req=req, c=c, name=name: send(name, c, req)  # noqa: E731
                    times[name] += timed(call, args.repeats, warmup=int(turn == 0))
            for name in clients:
                results[name]["matrix"][cell] = summary(times[name])
                record(args, name, "matrix-" + cell.replace("/", "").replace(" ", "-"), results[name]["matrix"][cell])
                print(f"  {name} {cell}: {results[name]['matrix'][cell]['median_s']:.3f} s", flush=True)
            if args.step_times:  # (ours: the unet passes of this cell, warm-up included)
                steps = step_times(trace_file, since)
                results["swiftdiffusion"]["matrix"][cell]["steps"] = steps
                record(args, "swiftdiffusion", "steps-" + cell.replace("/", "").replace(" ", "-"), steps)
                print(f"  swiftdiffusion {cell} per step: {steps}", flush=True)
        if args.matrix_only or out_of_time(args, "the rate sweep"):
            args.matrix_only = True  # (the report then has the matrix alone)
            return results, []
        # Steady state of a long-running server: every adapter the traces use has been used once (our caches are
        # warm; the baseline has none). Cold-start costs are in the matrix above.
        names = generate_trace(TraceSpec(rate=1.0, max_requests=2000))
        sample = generate_trace(TraceSpec(rate=1.0, max_requests=args.capacity_requests, seed=99))
        for name, c in clients.items():
            for kind in ("controlnets", "loras"):
                for adapter in sorted({n for r in names for n in r[kind]}):
                    c.generate(
                        to_request({"seed": 0, "controlnets": [], "loras": [], kind: [adapter]}, args.steps, args.size)
                    )
            each = timed(lambda c=c: [c.generate(to_request(r, args.steps, args.size)) for r in sample], 1, warmup=0)
            results[name]["service_mean_s"] = each[0] / len(sample)
        mean = results[next(iter(results))]["service_mean_s"]
        args.slo = args.slo or round(2.5 * mean, 2)
        rates = [float(r) for r in args.rates.split(",")] if args.rates else [round(f / mean, 2) for f in RATE_FACTORS]
        print(f"baseline: {mean:.3f} s per trace request -> capacity {1 / mean:.2f}/s; SLO {args.slo} s; {rates}")
        for rate in rates:
            if out_of_time(args, f"rate {rate:g} and after"):
                break
            trace = generate_trace(TraceSpec(rate=rate, max_requests=args.requests_per_rate, seed=7))
            for name, server in servers.items():
                result = asyncio.run(replay(server.grpc_url, trace, args.steps, args.size, args.slo))
                results[name]["sweep"][f"{rate:g}"] = result
                record(args, name, f"rate-{rate:g}", result)
                print(
                    f"  {name} rate {rate:g}/s: attainment {100 * result['slo_attainment']:.0f}%, "
                    f"p50 {result['p50_s']:.2f} s, p99 {result['p99_s']:.2f} s",
                    flush=True,
                )
        # Memory: each server alone once the one before it is measured and stopped (PSS splits a shared library's
        # pages between every process that maps it, the other server's too; the last one measured is ours).
        for name, server in servers.items():
            results[name]["memory"] = server.memory()
            results[name]["memory_pss"] = server.memory("Pss")
            server.stop()
    return results, rates


def throughput_at_slo(sweep: dict, target: float = 0.9) -> float:
    """The highest rate of the sweep at which at least ``target`` of the requests met the SLO (0: none)."""
    return max((float(rate) for rate, r in sweep.items() if r["slo_attainment"] >= target), default=0.0)


def slo_crossing(sweep: dict, target: float = 0.9) -> float:
    """The rate at which attainment first falls below ``target``, linearly interpolated between the points around it
    (from 100 % at rate 0 when the first point misses; the highest rate when none does). Less jumpy than
    :func:`throughput_at_slo` on a coarse sweep: a point missed by one request moves it a little, not a whole step.
    """
    points = sorted((float(rate), r["slo_attainment"]) for rate, r in sweep.items())
    below = next((i for i, (_, a) in enumerate(points) if a < target), None)
    if below is None:
        return points[-1][0] if points else 0.0
    (r0, a0), (r1, a1) = ((0.0, 1.0), *points)[below : below + 2]
    return r0 + (r1 - r0) * (a0 - target) / (a0 - a1)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    keys = list(results["swiftdiffusion"]["matrix"])
    x = np.arange(len(keys))
    for offset, system in ((-0.2, "swiftdiffusion"), (0.2, "baseline")):
        left.bar(x + offset, [results[system]["matrix"][k]["median_s"] for k in keys], 0.4, label=system)
    left.set_xticks(x, keys)
    left.set_ylabel("median latency (s), one request at a time")
    left.set_title(f"txt2img by adapters ({settings['arch']} {settings['preset']}, {settings['steps']} steps)")
    left.legend()
    for system, marker in (("swiftdiffusion", "o"), ("baseline", "s")):
        sweep = results[system]["sweep"]
        rates = [float(r) for r in sweep]
        right.plot(rates, [100 * sweep[r]["slo_attainment"] for r in sweep], marker=marker, label=system)
    right.axhline(90, color="grey", linestyle=":", label="90 % (throughput at SLO)")
    right.set_xlabel("request rate (req/s, Poisson)")
    right.set_ylabel(f"SLO attainment (%), SLO {settings['slo']:.2f} s")
    right.set_ylim(0, 105)
    right.set_title(f"{settings['requests_per_rate']} requests per rate, LoRA/ControlNet-heavy Zipf trace")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="default-model preset (tiny, cpu); ignored with --model-dir")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"], help="default-model architecture")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=0, help="pixels; 0 = the model's native size")
    ap.add_argument("--repeats", type=int, default=10, help="matrix: requests per block")
    ap.add_argument(
        "--matrix-rounds", type=int, default=3, help="matrix: blocks per system and cell, the systems alternating"
    )
    ap.add_argument("--rates", default="", help="comma-separated req/s; default 0.5x..1.5x the baseline's capacity")
    ap.add_argument("--requests-per-rate", type=int, default=60)
    ap.add_argument("--capacity-requests", type=int, default=12, help="trace requests timed for the capacity")
    ap.add_argument("--slo", type=float, default=0.0, help="latency SLO in seconds; 0 = 2.5x the baseline's mean")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: model stages on GPU 0")
    ap.add_argument("--dtype", default="auto", help="stage dtype on GPU (auto = float16)")
    ap.add_argument("--model-dtype", default="float32", help="weights of a generated default model on disk")
    ap.add_argument("--out", default="results")
    ap.add_argument("--matrix-only", action="store_true", help="only the latency cells: no rate sweep, no memory")
    ap.add_argument("--layout", default="", help="ours: a layout name (default: cpu, or 1gpu with --device cuda)")
    ap.add_argument(
        "--cells", default="", help="comma-separated matrix cells to run (e.g. 0C/0L,1C/0L; none: no cell); default all"
    )
    ap.add_argument("--deadline-s", type=float, default=0.0, help="start no cell or sweep after this many seconds")
    ap.add_argument("--step-times", action="store_true", help="trace ours: per-step ms of the unet passes per cell")
    args = ap.parse_args()
    args.started = time.monotonic()

    source = (
        Path(args.model_dir)
        if args.model_dir
        else write_default_model(
            default_model_dir(args.arch, args.preset), preset=args.preset, arch=args.arch, dtype=args.model_dtype
        )
    )
    work = Path(tempfile.mkdtemp(prefix="swiftdiffusion-bench-"))
    model_dir = work / "model"
    # The trace adds adapters; never touch the source store. Links, not copies: a full-size model is gigabytes. The
    # LoRAs (megabytes) are copied: the LoRA store refuses a file that links outside it.
    shutil.copytree(source, model_dir, copy_function=os.symlink, ignore=shutil.ignore_patterns("loras"))
    shutil.copytree(source / "loras", model_dir / "loras")
    if not args.size:
        unet = json.loads((model_dir / "unet" / "config.json").read_text())
        vae = json.loads((model_dir / "vae" / "config.json").read_text())
        args.size = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    # Every trace draws from the same adapter names (Zipf over a fixed set): materialize them all up front.
    materialize_adapters(model_dir, generate_trace(TraceSpec(rate=1.0, max_requests=2000)))
    try:
        # Ours: the repository serve renders here (--layout auto: cpu without a GPU, 1gpu on one).
        layout = Layout.named(args.layout or ("1gpu" if args.device == "cuda" else "cpu"), args.dtype)
        ours = render(work / "ours", [Pipeline("txt2img", model_dir)], layout, stage_prefix="", load_stages=False)
        base = baseline_repository_dir()
        if args.device == "cuda":
            base = gpu_repository(base, args.dtype)
        results, rates = measure({"baseline": base, "swiftdiffusion": ours}, model_dir, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["settings"] = {**vars(args), "model_dir": str(source), "rates": rates}
    table = report(results, args)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(table + "\n")
    write_results(out, "benchmark", results)
    try:
        if not args.matrix_only:
            chart(results, out / "benchmark.png")
    except ImportError:
        print("matplotlib is not installed: no chart")
    print(f"wrote {out}/benchmark.{{json,md,png}}")
    return 0


def report(results: dict, args: argparse.Namespace) -> str:
    """The Markdown tables: matrix, sweep (side by side per rate), throughput at SLO, memory per stage."""
    ours, base = results["swiftdiffusion"], results["baseline"]
    m = machine()
    lines = [
        f"Machine: {m['platform']}, {m['cpus']} CPUs{', ' + m['gpu'] if 'gpu' in m else ''}; {args.arch} preset "
        f"{args.preset}; {args.steps} steps; {args.size}x{args.size}; matrix: median of {args.matrix_rounds} blocks of "
        f"{args.repeats} per system, alternating.",
        "",
        "| adapters | SwiftDiffusion median s | p95 s | baseline median s | p95 s | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for key, o in ours["matrix"].items():
        b = base["matrix"][key]
        lines.append(
            f"| {key} | {o['median_s']:.3f} | {o['p95_s']:.3f} | {b['median_s']:.3f} | {b['p95_s']:.3f} | "
            f"{b['median_s'] / o['median_s']:.2f}x |"
        )
    if args.matrix_only:
        return "\n".join(lines)
    lines += [
        "",
        f"Rate sweep: {args.requests_per_rate} requests per rate (Poisson, 0-3 ControlNets, 0-2 LoRAs, Zipf), "
        f"SLO {args.slo} s (DEADLINE_MS on every request); baseline mean service time "
        f"{base['service_mean_s']:.3f} s (capacity {1 / base['service_mean_s']:.2f}/s), SwiftDiffusion "
        f"{ours['service_mean_s']:.3f} s.",
        "",
        "| rate/s | SD attainment | baseline | SD goodput/s | baseline | SD p50 s | baseline | SD p99 s | baseline |"
        " SD errors | baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rate, o in ours["sweep"].items():
        b = base["sweep"][rate]
        lines.append(
            f"| {rate} | {100 * o['slo_attainment']:.0f}% | {100 * b['slo_attainment']:.0f}% | "
            f"{o['goodput_rps']:.2f} | {b['goodput_rps']:.2f} | {o['p50_s']:.2f} | {b['p50_s']:.2f} | "
            f"{o['p99_s']:.2f} | {b['p99_s']:.2f} | "
            f"{o['errors']} | {b['errors']} |"
        )
    t_ours, t_base = throughput_at_slo(ours["sweep"]), throughput_at_slo(base["sweep"])
    ratio = f"{t_ours / t_base:.2f}x" if t_base else "n/a (the baseline met 90 % at no rate)"
    lines += [
        "",
        f"Throughput at SLO (>= 90 % attainment): SwiftDiffusion {t_ours:g}/s, baseline {t_base:g}/s: {ratio}.",
    ]
    c_ours, c_base = slo_crossing(ours["sweep"]), slo_crossing(base["sweep"])
    if c_base:
        lines += [
            "",
            f"Interpolated (where attainment first falls below 90 %): SwiftDiffusion {c_ours:.2f}/s, baseline "
            f"{c_base:.2f}/s: {c_ours / c_base:.2f}x.",
        ]
    stages = sorted(ours["memory"])
    lines += [
        "",
        "| memory after the sweep (MB) | " + " | ".join(stages) + " | total |",
        "|---|" + "---|" * (len(stages) + 1),
    ]
    for name, system in (("SwiftDiffusion", ours), ("baseline", base)):
        for kind, key in (("RSS", "memory"), ("PSS", "memory_pss")):
            mem = system[key]
            cells = [f"{mem[k] / 2**20:.0f}" if k in mem else "-" for k in stages]
            lines.append(f"| {name} {kind} | " + " | ".join(cells) + f" | {sum(mem.values()) / 2**20:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
