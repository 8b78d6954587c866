#!/usr/bin/env python
"""Digests of the images a server answers a fixed set of requests with: the check that a refactoring changed no
image, bit for bit, in a layout (plain, a LoRA, a ControlNet, both, streamed; on an SDXL model: plain, a LoRA).

    python scripts/image_digests.py --model-repository DIR [--model-dir DIR] [--arch sd1|sdxl] > digests.json
    PYTHONPATH=OTHER_TREE python scripts/image_digests.py ...   # the same against another checkout

Prints one JSON object: case -> sha256 of the image's bytes (with its shape), and after the requests: the stub
processes of each model, their PSS and RSS in MB, and each model's successful inferences (Triton's statistics: a
model that ran none is idle). Run it on two trees or two layouts and compare the outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from swiftdiffusion_client import Client, GenerationRequest

import triton_backend
from triton_backend.paths import default_model_dir
from triton_backend.serving.server import TritonServer
from triton_backend.serving.watchdog import stub_processes


def hint(size: int = 64) -> np.ndarray:
    yy, xx = np.indices((size, size))
    stripes = ((xx + yy) // 4 % 2 * 255).astype(np.uint8)
    return np.stack([stripes, stripes // 2, 255 - stripes], axis=-1)[None]


def cases(arch: str, size: int) -> dict[str, GenerationRequest]:
    base = dict(prompt="a red barn in the snow", seed=7, steps=4)
    lora = dict(lora_names=("pastel_peft",), lora_bound_k=0)
    control = dict(controlnet_names=("edges",), controlnet_images=hint(size))
    if arch == "sdxl":
        return {"sdxl_plain": GenerationRequest(**base), "sdxl_lora": GenerationRequest(**base, **lora)}
    return {
        "plain": GenerationRequest(**base),
        "lora": GenerationRequest(**base, **lora),
        "controlnet": GenerationRequest(**base, **control),
        "lora_controlnet": GenerationRequest(**base, **lora, **control),
        "streamed_lora_controlnet": GenerationRequest(**base, **lora, **control),
    }


def digest(image: np.ndarray) -> str:
    return f"{hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]} {list(image.shape)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", required=True)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"])
    parser.add_argument("--size", type=int, default=64, help="hint image size (the model's native output size)")
    args = parser.parse_args()
    model_dir = Path(args.model_dir or default_model_dir(args.arch))
    log = Path(tempfile.mkdtemp(prefix="digests-")) / "server.log"
    out = {}
    server = TritonServer(model_dir=model_dir, model_repository=Path(args.model_repository), log_file=log)
    with server, Client(server.grpc_url, timeout_s=300) as client:
        for name, request in cases(args.arch, args.size).items():
            streamed = name.startswith("streamed")
            out[name] = digest(list(client.stream(request))[-1].image if streamed else client.generate(request))
        stats = server.client().get_inference_statistics(as_json=True)["model_stats"]
        out["inferences"] = {m["name"]: int(m["inference_stats"]["success"].get("count", 0)) for m in stats}
        out["processes"] = {model: len(pids) for model, pids in stub_processes(server.process.pid).items()}
        for kind in ("Pss", "Rss"):
            memory = server.memory(kind)
            out[f"{kind.lower()}_mb"] = {**{k: round(v / 2**20) for k, v in memory.items()}}
            out[f"{kind.lower()}_mb"]["total"] = round(sum(memory.values()) / 2**20)
    out["code"] = str(Path(triton_backend.__file__).parent)  # (the tree the server ran: PYTHONPATH picks it)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
