"""Latent parallelism and step-level batching against the real server."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from swiftdiffusion_client import GenerationRequest

from .helpers import assert_same_image, generate_concurrently

pytestmark = pytest.mark.integration


def _chain(client, req: GenerationRequest, parallel: bool) -> np.ndarray:
    tensors = req.to_tensors()
    embeds = client.infer_raw(
        {k: v for k, v in tensors.items() if k in ("PROMPT", "NEGATIVE_PROMPT", "GUIDANCE_SCALE")}, model="text_encoder"
    )["PROMPT_EMBEDS"]
    fields = {k: v for k, v in tensors.items() if k not in ("PROMPT", "NEGATIVE_PROMPT")}
    latents = client.infer_raw(
        {"PROMPT_EMBEDS": embeds, **fields, "LATENT_PARALLEL": np.array([parallel])}, model="denoise"
    )["LATENTS"]
    return client.infer_raw({"LATENTS": latents}, model="vae")["IMAGES"][0]


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m"])
def test_latent_parallel_equals_batch2_cfg_and_diffusers(client, reference, scheduler):
    req = GenerationRequest(
        prompt="a photo of a horse", negative_prompt="blurry", seed=21, steps=4, scheduler=scheduler
    )
    parallel, batch2 = _chain(client, req, True), _chain(client, req, False)
    ref = reference(req)
    assert_same_image(parallel, batch2)
    assert_same_image(parallel, ref)
    assert_same_image(batch2, ref)


def _unet_batches(url: str) -> dict[int, int]:
    c = grpcclient.InferenceServerClient(url)
    try:
        stats = c.get_inference_statistics("unet", as_json=True)["model_stats"][0]
    finally:
        c.close()
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def test_concurrent_requests_are_batched_step_wise_and_each_equals_its_single_result(server, reference):
    requests = [
        GenerationRequest(prompt=f"a {w} at night", seed=30 + i, steps=4 + i % 3, scheduler=s, guidance_scale=g)
        for i, (w, s, g) in enumerate(
            [
                ("cat", "euler", 7.5),
                ("dog", "ddim", 7.5),
                ("tree", "euler_a", 3.0),
                ("house", "dpmpp_2m", 1.0),
                ("horse", "unipc", 7.5),
                ("robot", "pndm", 5.0),
                ("castle", "default", 7.5),
                ("car", "euler", 1.0),
            ]
        )
    ]
    before = _unet_batches(server.grpc_url)

    for _ in range(2):  # twice: the first round may start while the instances are still idle
        images = generate_concurrently(server.grpc_url, requests)
        for req, image in zip(requests, images, strict=True):
            assert_same_image(image, reference(req))
    after = _unet_batches(server.grpc_url)
    merged = {b: after.get(b, 0) - before.get(b, 0) for b in after if b > 1}
    assert sum(merged.values()) > 0, f"no step requests were batched together: {after}"
