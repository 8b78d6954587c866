"""What the cross-request caches save (docs/operations.md "Cross-request caches"), side by side in one run.

    python scripts/bench_caches.py [--preset tiny|cpu] [--steps 4] [--size 128] [--repeats 10]

Starts two servers on the same model: the default repository (prompt- and hint-embedding caches on) and the same
repository with ``prompt_cache_mb`` and ``hint_cache_mb`` set to 0. Two workloads, alternating the servers request
by request so both see the same machine noise:

- repeated prompt: one prompt, a new seed per request (the UNet work stays; only the text encoding can be saved);
- repeated hint: one ControlNet hint image, a new prompt per request (only the hint embedding can be saved).

Prints the median end-to-end latency and the median time the request spent in the stage the cache serves
(Triton's statistics of ``text_encoder`` / ``controlnet``: queue + compute, per request), with and without.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from swiftdiffusion_client import Client, GenerationRequest

from triton_backend.paths import default_model_dir
from triton_backend.serving.repository import Pipeline, render
from triton_backend.serving.server import TritonServer
from triton_backend.tools.bench import summary
from triton_backend.tools.default_model import write_default_model
from triton_backend.tools.workload import synthetic_hints

#: The cache budget parameters, by template model: set to 0, the caches are off.
CACHES_OFF = {"text_encoder": {"prompt_cache_mb": "0"}, "controlnet": {"hint_cache_mb": "0"}}


def stage_ns(client: Client, model: str) -> int:
    """Cumulative queue + compute nanoseconds of ``model`` (every request it served)."""
    stats = client._client.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
    return sum(int(stats[k]["ns"]) for k in ("queue", "compute_input", "compute_infer", "compute_output"))


def run(workload: str, requests: list[GenerationRequest], clients: dict[str, Client]) -> None:
    stage = "text_encoder" if workload == "repeated prompt" else "controlnet"
    latency: dict[str, list[float]] = {name: [] for name in clients}
    in_stage: dict[str, list[float]] = {name: [] for name in clients}
    for client in clients.values():  # warm both: the first request fills the cache
        client.generate(requests[0])
    for req in requests[1:]:
        for name, client in clients.items():
            before = stage_ns(client, stage)
            start = time.perf_counter()
            client.generate(req)
            latency[name].append(time.perf_counter() - start)
            in_stage[name].append((stage_ns(client, stage) - before) / 1e9)
    on, off = (summary(latency[n])["median_s"] for n in ("cache on", "cache off"))
    s_on, s_off = (summary(in_stage[n])["median_s"] for n in ("cache on", "cache off"))
    print(f"{workload} ({len(requests) - 1} requests each, alternating):")
    print(
        f"  end to end: cache on {on * 1000:.1f} ms, off {off * 1000:.1f} ms -> {off / on:.3f}x "
        f"({(off - on) * 1000:+.1f} ms)"
    )
    print(f"  in {stage}: cache on {s_on * 1000:.2f} ms, off {s_off * 1000:.2f} ms per request")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    model_dir = write_default_model(default_model_dir("sd1", args.preset), preset=args.preset)
    work = Path(tempfile.mkdtemp(prefix="swiftdiffusion-caches-"))
    pipeline = [Pipeline("txt2img", model_dir)]
    on_repo = render(work / "on", pipeline, stage_prefix="", load_stages=False)
    off_repo = render(work / "off", pipeline, stage_prefix="", load_stages=False, overrides=CACHES_OFF)
    size = {"height": args.size, "width": args.size, "steps": args.steps}
    prompts = [
        GenerationRequest(prompt="a lighthouse at dusk, oil painting", seed=i, **size) for i in range(args.repeats + 1)
    ]
    hint = synthetic_hints(1, args.size)
    hints = [
        GenerationRequest(
            prompt=f"a dancer, style {i}", seed=i, controlnet_names=("edges",), controlnet_images=hint, **size
        )
        for i in range(args.repeats + 1)
    ]
    print(f"model: {args.preset} preset, {args.steps} steps, {args.size}x{args.size}")
    with (
        TritonServer(model_dir=model_dir, model_repository=on_repo, log_file=work / "on.log") as on,
        TritonServer(model_dir=model_dir, model_repository=off_repo, log_file=work / "off.log") as off,
        Client(on.grpc_url) as c_on,
        Client(off.grpc_url) as c_off,
    ):
        clients = {"cache on": c_on, "cache off": c_off}
        run("repeated prompt", prompts, clients)
        run("repeated hint", hints, clients)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
