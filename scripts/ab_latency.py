#!/usr/bin/env python
"""One request at a time, the same requests on two running servers, interleaved: the A/B of two trees or two
deployments on one machine (this machine is shared and noisy: alternating requests sees the same noise).

    swiftdiffusion serve --model-dir M --grpc-port 9001 ...                      # A (e.g. another checkout)
    swiftdiffusion serve --model-dir M --grpc-port 9101 ...                      # B
    python scripts/ab_latency.py --a 127.0.0.1:9001 --b 127.0.0.1:9101 --size 128 --steps 12 --repeats 30

Cells: plain, 1 ControlNet + 1 LoRA (k = 0). Prints each cell's median and p90 per server and the ratio B/A of
the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from swiftdiffusion_client import Client, GenerationRequest

from triton_backend.tools.workload import synthetic_hints


def cells(size: int, steps: int) -> dict[str, GenerationRequest]:
    base = dict(prompt="a lighthouse at dusk", seed=3, steps=steps, height=size, width=size)
    adapters = dict(
        lora_names=("ink_kohya",),
        lora_bound_k=0,
        controlnet_names=("edges",),
        controlnet_images=synthetic_hints(1, size),
    )
    return {"plain": GenerationRequest(**base), "1C/1L": GenerationRequest(**base, **adapters)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="HOST:PORT of server A")
    parser.add_argument("--b", required=True, help="HOST:PORT of server B")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    with Client(args.a, timeout_s=300) as a, Client(args.b, timeout_s=300) as b:
        clients = {"A": a, "B": b}
        for name, request in cells(args.size, args.steps).items():
            times: dict[str, list[float]] = {"A": [], "B": []}
            for client in clients.values():  # warm-up: adapters loaded, caches filled
                client.generate(request)
            for i in range(args.repeats):
                for label in "AB" if i % 2 == 0 else "BA":
                    start = time.perf_counter()
                    clients[label].generate(request)
                    times[label].append(time.perf_counter() - start)
            med = {k: statistics.median(v) for k, v in times.items()}
            p90 = {k: statistics.quantiles(v, n=10)[-1] for k, v in times.items()}
            print(
                f"{name:6} A {med['A'] * 1000:7.1f} ms (p90 {p90['A'] * 1000:7.1f})   "
                f"B {med['B'] * 1000:7.1f} ms (p90 {p90['B'] * 1000:7.1f})   B/A {med['B'] / med['A']:.3f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
