#!/usr/bin/env python
"""Digests of the images a server answers a fixed set of requests with: the check that a refactoring changed no
image, bit for bit, in a layout (plain, a LoRA, a ControlNet, both, streamed; on an SDXL model: plain, a LoRA).

    python scripts/image_digests.py --model-repository DIR [--model-dir DIR] [--arch sd1|sdxl] > digests.json

Prints one JSON object: case -> sha256 of the image's bytes (with its shape). Run it on two trees or two layouts
and compare the outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swiftdiffusion_client import Client, GenerationRequest

from triton_backend.paths import default_model_dir
from triton_backend.serving.server import TritonServer


def hint(size: int = 64) -> np.ndarray:
    yy, xx = np.indices((size, size))
    stripes = ((xx + yy) // 4 % 2 * 255).astype(np.uint8)
    return np.stack([stripes, stripes // 2, 255 - stripes], axis=-1)[None]


def cases(arch: str) -> dict[str, GenerationRequest]:
    base = dict(prompt="a red barn in the snow", seed=7, steps=4)
    lora = dict(lora_names=("pastel_peft",), lora_bound_k=0)
    control = dict(controlnet_names=("edges",), controlnet_images=hint())
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
    args = parser.parse_args()
    model_dir = Path(args.model_dir or default_model_dir(args.arch))
    log = Path(tempfile.mkdtemp(prefix="digests-")) / "server.log"
    out = {}
    server = TritonServer(model_dir=model_dir, model_repository=Path(args.model_repository), log_file=log)
    with server, Client(server.grpc_url, timeout_s=300) as client:
        for name, request in cases(args.arch).items():
            streamed = name.startswith("streamed")
            out[name] = digest(list(client.stream(request))[-1].image if streamed else client.generate(request))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
