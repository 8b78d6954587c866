"""Step 3 of the device check: one server as ``serve`` runs it on one GPU (the ``1gpu`` layout, fp16) on the
SD1.5-size model written here in fp16: how long it takes to load, the GPU memory of every process
(``nvidia-smi --query-compute-apps``, by model) and host RSS, then single requests (plain, one ControlNet, one
LoRA): the first (cold) and the median of three warm ones. ``server.json`` is rewritten after each measurement, so a
step cut short keeps what it got.

    python scripts/device/server.py --mode cuda|cpu --out RESULTS

``--mode cpu`` (the rehearsal): the tiny model, the ``split`` layout on the CPU, 4 steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from swiftdiffusion_client import Client, GenerationRequest

from triton_backend.paths import default_model_dir
from triton_backend.serving.repository import Layout, Pipeline, render
from triton_backend.serving.server import TritonServer
from triton_backend.serving.watchdog import stub_processes
from triton_backend.tools.default_model import write_default_model
from triton_backend.tools.workload import synthetic_hints


def gpu_memory_mib(server_pid: int) -> dict[str, int | str]:
    """MiB of GPU memory per process of the server, by model name (``tritonserver`` for the server itself); a line
    ``nvidia-smi`` gives without a number (``[N/A]``) is kept as its text.
    """
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
    ).stdout
    names = {pid: model for model, pids in stub_processes(server_pid).items() for pid in pids}
    names[server_pid] = "tritonserver"
    result: dict[str, int | str] = {}
    for line in out.splitlines():
        pid, _, mib = (part.strip() for part in line.partition(","))
        if not pid.isdigit():
            continue
        name = names.get(int(pid), f"other-{pid}")
        if mib.isdigit():
            result[name] = int(result.get(name, 0)) + int(mib)
        else:
            result[name] = mib
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["cuda", "cpu"], required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    facts: dict = {"mode": args.mode}

    def save() -> None:
        (out / "server.json").write_text(json.dumps(facts, indent=1))

    cuda = args.mode == "cuda"
    preset, steps, size = ("sd15", 20, 512) if cuda else ("tiny", 4, 64)
    start = time.perf_counter()
    model_dir = write_default_model(
        default_model_dir("sd1", preset), preset=preset, dtype="float16" if cuda else "float32"
    )
    facts["model"] = {"preset": preset, "written_s": round(time.perf_counter() - start, 1)}
    save()
    layout = Layout.named("1gpu", "float16") if cuda else Layout.named("split")
    facts["layout"] = layout.name
    pipelines = [Pipeline("txt2img", model_dir)]
    repo = render(out / "server-repository", pipelines, layout, stage_prefix="", load_stages=False)
    (out / "server-logs").mkdir(exist_ok=True)
    server = TritonServer(model_dir=model_dir, model_repository=repo, log_file=out / "server-logs" / "server-step.log")
    start = time.perf_counter()
    server.start(timeout=300)
    try:
        facts["load_s"] = round(time.perf_counter() - start, 1)
        facts["host_rss_mib"] = {k: round(v / 2**20) for k, v in server.memory().items()}
        if cuda:
            facts["gpu_memory_mib_idle"] = gpu_memory_mib(server.process.pid)
        save()
        requests = {
            "plain": GenerationRequest(
                prompt="an astronaut riding a horse", seed=1, steps=steps, height=size, width=size
            ),
        }
        plain = requests["plain"]
        requests["1C"] = replace(plain, controlnet_names=("edges",), controlnet_images=synthetic_hints(1, size))
        requests["1L"] = replace(plain, lora_names=("ink_kohya",))
        facts["requests"] = {"steps": steps, "size": size}
        with Client(server.grpc_url, timeout_s=300) as client:
            for name, request in requests.items():
                times = []
                for _ in range(4):
                    t0 = time.perf_counter()
                    client.generate(request)
                    times.append(time.perf_counter() - t0)
                facts["requests"][name] = {
                    "cold_s": round(times[0], 3),
                    "warm_median_s": round(statistics.median(times[1:]), 3),
                }
                print(f"{name}: {facts['requests'][name]}", flush=True)
                save()
        if cuda:
            facts["gpu_memory_mib_after"] = gpu_memory_mib(server.process.pid)
        facts["host_rss_mib_after"] = {k: round(v / 2**20) for k, v in server.memory().items()}
        save()
    finally:
        server.stop(grace_s=5)
    print(json.dumps(facts, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
