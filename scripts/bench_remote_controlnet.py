"""The cost of the ControlNet service on another server (docs/operations.md "Stages on another server"), side by side.

    python scripts/bench_remote_controlnet.py [--preset tiny|cpu] [--steps 8] [--repeats 20]

Starts a ControlNet-only server and a pipeline server calling it by URL, plus a one-server deployment, and times
the same 1-ControlNet request (median of --repeats, alternating the two) on both; prints the difference per step.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from swiftdiffusion_client import Client, GenerationRequest

from triton_backend.paths import default_model_dir, model_repository_dir
from triton_backend.serving.repository import Pipeline, render
from triton_backend.serving.server import TritonServer
from triton_backend.tools.bench import summary
from triton_backend.tools.default_model import write_default_model
from triton_backend.tools.workload import synthetic_hints


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    model_dir = write_default_model(default_model_dir("sd1", args.preset), preset=args.preset)
    work = Path(tempfile.mkdtemp(prefix="swiftdiffusion-remote-"))
    shutil.copytree(model_repository_dir() / "controlnet", work / "cn" / "controlnet")
    req = GenerationRequest(
        prompt="a cat",
        steps=args.steps,
        height=args.size,
        width=args.size,
        controlnet_names=("edges",),
        controlnet_images=synthetic_hints(1, args.size),
    )
    times: dict[str, list[float]] = {"two servers": [], "one server": []}
    with TritonServer(model_dir=model_dir, model_repository=work / "cn") as remote:
        repo = render(
            work / "pipeline",
            [Pipeline("txt2img", model_dir)],
            stage_prefix="",
            load_stages=False,
            remote={"controlnet": remote.grpc_url},
        )
        with (
            TritonServer(model_dir=model_dir, model_repository=repo) as two,
            TritonServer(model_dir=model_dir) as one,
            Client(two.grpc_url) as c2,
            Client(one.grpc_url) as c1,
        ):
            c2.generate(req), c1.generate(req)
            for _ in range(args.repeats):  # alternate: both see the same machine noise
                for name, client in (("two servers", c2), ("one server", c1)):
                    start = time.perf_counter()
                    client.generate(req)
                    times[name].append(time.perf_counter() - start)
    shutil.rmtree(work, ignore_errors=True)
    medians = {k: summary(v)["median_s"] for k, v in times.items()}
    for name, value in medians.items():
        print(f"{name}: median {value:.3f} s over {args.repeats} ({args.steps} steps, {args.size}px, 1 ControlNet)")
    extra = medians["two servers"] - medians["one server"]
    print(
        f"extra: {extra:+.3f} s per request, {1000 * extra / args.steps:+.1f} ms per step "
        f"({medians['two servers'] / medians['one server']:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
