"""ControlNets through txt2img on the real server: equal to diffusers, overlap with the UNet, bad input."""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from swiftdiffusion_client import GenerationRequest, InvalidArgumentError, NotFoundError

from triton_backend.controlnet.service import HINT_CACHE_PREFIX

from .helpers import (
    assert_rejected_then_served,
    assert_same_image,
    diffusers_controlnet_image,
    generate_concurrently,
    hint_images,
    on_cuda,
)

pytestmark = pytest.mark.integration


def _hint_files() -> list[Path]:
    """Hint embeddings of requests (the cache's own files stay: tests/test_caches.py)."""
    files = [p for d in Path("/dev/shm").glob("swiftdiffusion-cn-*") for p in d.glob("*.safetensors")]
    return [p for p in files if not p.name.startswith(HINT_CACHE_PREFIX)]


def test_one_controlnet_equals_diffusers(client, reference, model_dir):
    req = GenerationRequest(
        prompt="a photo of a cat",
        negative_prompt="blurry",
        seed=3,
        steps=4,
        controlnet_names=("edges",),
        controlnet_images=hint_images(1),
        controlnet_scales=(0.8,),
    )
    assert_same_image(client.generate(req), diffusers_controlnet_image(reference, model_dir, req))


def test_two_controlnets_equal_multicontrolnet(client, reference, model_dir):
    req = GenerationRequest(
        prompt="a red house",
        seed=5,
        steps=4,
        scheduler="ddim",
        controlnet_names=("edges", "depth"),
        controlnet_images=hint_images(2),
        controlnet_scales=(1.2, 0.5),
        controlnet_guidance_start=(0.0, 0.25),
        controlnet_guidance_end=(0.75, 1.0),
    )
    assert_same_image(client.generate(req), diffusers_controlnet_image(reference, model_dir, req))


def test_controlnets_with_loras_and_concurrency(server, reference, model_dir):
    requests = [
        GenerationRequest(
            prompt=f"a {w}",
            seed=60 + i,
            steps=4,
            controlnet_names=names,
            controlnet_images=hint_images(len(names), seed=i) if names else None,
        )
        for i, (w, names) in enumerate(
            [("cat", ("edges",)), ("dog", ()), ("tree", ("depth", "edges")), ("house", ("depth",))]
        )
    ]
    images = generate_concurrently(server.grpc_url, requests)
    for req, image in zip(requests, images, strict=True):
        expected = diffusers_controlnet_image(reference, model_dir, req) if req.controlnet_names else reference(req)
        assert_same_image(image, expected)
    assert not _hint_files(), "hint embeddings must be freed when requests end"


def test_encoder_half_runs_while_the_controlnet_request_is_in_flight(server, client):
    server.trace_file.write_text("")
    client.generate(
        GenerationRequest(prompt="x", steps=4, controlnet_names=("edges",), controlnet_images=hint_images(1))
    )
    events = [json.loads(line) for line in server.trace_file.read_text().splitlines()]
    sent = [e["t"] for e in events if e["event"] == "unet_controlnet_sent"]
    starts = [e for e in events if e["event"] == "unet_encoder_start" and e["controlnet"]]
    ends = {e["id"]: e["t"] for e in events if e["event"] == "unet_encoder_end"}
    cn_done = [e["t"] for e in events if e["event"] == "controlnet_step_end"]
    assert len(starts) >= 4 and sent and cn_done
    overlapped = 0
    for start in starts:
        # a ControlNet request sent before this encoder half began, and answered after it began
        before = [t for t in sent if t <= start["t"]]
        if before and any(t > start["t"] for t in cn_done if t >= max(before)):
            overlapped += 1
        assert ends[start["id"]] >= start["t"]
    assert overlapped >= 1, "no step ran its encoder half while its ControlNet request was in flight"
    # The residuals' path, as the trace records it: on a GPU they arrive there (DLPack, no host copy); here the
    # same code hands over CPU tensors.
    arrived = {d for e in events if e["event"] == "unet_residuals_received" for d in e["arrived"]}
    assert arrived == ({"cuda:0"} if on_cuda() else {"cpu"})


@pytest.mark.parametrize(
    "override,error,needle",
    [
        (
            {"CONTROLNET_NAMES": np.array([b"nope"], dtype=object), "CONTROLNET_IMAGES": hint_images(1)},
            NotFoundError,
            "edges",
        ),
        (
            {"CONTROLNET_NAMES": np.array([b"edges"], dtype=object), "CONTROLNET_IMAGES": hint_images(1, 32)},
            InvalidArgumentError,
            "CONTROLNET_IMAGES",
        ),
        (
            {"CONTROLNET_NAMES": np.array([b"edges", b"depth"], dtype=object), "CONTROLNET_IMAGES": hint_images(1)},
            InvalidArgumentError,
            "CONTROLNET_IMAGES",
        ),
        (
            {
                "CONTROLNET_NAMES": np.array([b"edges"], dtype=object),
                "CONTROLNET_IMAGES": hint_images(1),
                "CONTROLNET_SCALES": np.array([1.0, 1.0], np.float32),
            },
            InvalidArgumentError,
            "CONTROLNET_SCALES",
        ),
        (
            {
                "CONTROLNET_NAMES": np.array([b"edges"], dtype=object),
                "CONTROLNET_IMAGES": hint_images(1).astype(np.float32),
            },
            InvalidArgumentError,
            "CONTROLNET_IMAGES",
        ),
    ],
)
def test_bad_controlnet_input_and_server_keeps_serving(client, reference, override, error, needle):
    assert_rejected_then_served(client, reference, override, error, needle)
    assert not _hint_files()


def test_controlnet_metrics_are_exported(server, client):
    client.generate(
        GenerationRequest(prompt="x", steps=2, controlnet_names=("edges",), controlnet_images=hint_images(1))
    )
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for name in (
        "swiftdiffusion_controlnet_hits_total",
        "swiftdiffusion_controlnet_misses_total",
        "swiftdiffusion_controlnet_loads_total",
        "swiftdiffusion_controlnet_capacity",
        "swiftdiffusion_controlnet_resident",
        "swiftdiffusion_hint_cache_hits_total",
        "swiftdiffusion_hint_cache_misses_total",
        "swiftdiffusion_hint_cache_bytes",
        "swiftdiffusion_prompt_cache_hits_total",
        "swiftdiffusion_prompt_cache_budget_bytes",
    ):
        assert name in text, name


def metric(server, name: str, model: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    match = re.search(rf'^{name}{{model="{model}"}} ([0-9.e+]+)$', text, re.M)
    assert match, f"{name} of {model} not exported"
    return float(match.group(1))


def test_repeated_prompt_and_hint_hit_the_caches_and_change_no_image(server, client, reference, model_dir):
    req = GenerationRequest(
        prompt="one pose, many prompts",
        seed=21,
        steps=3,
        controlnet_names=("edges",),
        controlnet_images=hint_images(1, seed=5),
    )
    first = client.generate(req)
    prompt_hits = metric(server, "swiftdiffusion_prompt_cache_hits_total", "text_encoder")
    hint_hits = metric(server, "swiftdiffusion_hint_cache_hits_total", "controlnet")
    again = client.generate(req)
    assert metric(server, "swiftdiffusion_prompt_cache_hits_total", "text_encoder") == prompt_hits + 1
    assert metric(server, "swiftdiffusion_hint_cache_hits_total", "controlnet") == hint_hits + 1
    assert np.array_equal(first, again)
    assert_same_image(again, diffusers_controlnet_image(reference, model_dir, req))
    other = dataclasses.replace(req, prompt="another prompt", controlnet_images=hint_images(1, seed=6))
    misses = metric(server, "swiftdiffusion_hint_cache_misses_total", "controlnet")
    client.generate(other)
    assert metric(server, "swiftdiffusion_hint_cache_misses_total", "controlnet") == misses + 1
    assert not _hint_files()


def test_a_controlnet_directory_deleted_while_resident_is_refused_and_the_server_keeps_serving(
    client, reference, model_dir
):
    import shutil

    copy = model_dir / "controlnets" / "edges_copy"
    shutil.copytree(model_dir / "controlnets" / "edges", copy)
    req = GenerationRequest(
        prompt="a photo of a cat",
        seed=5,
        steps=3,
        controlnet_names=("edges_copy",),
        controlnet_images=hint_images(1),
        controlnet_scales=(0.8,),
    )
    try:
        client.generate(req)  # resident now
        shutil.rmtree(copy)
        with pytest.raises(NotFoundError, match=r"CONTROLNET_NAMES.*edges_copy"):
            client.generate(req)
        same = GenerationRequest(**{**req.__dict__, "controlnet_names": ("edges",)})
        assert_same_image(client.generate(same), diffusers_controlnet_image(reference, model_dir, same))
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def test_default_layout_controlnets_equal_diffusers_and_the_service(default_server, client, reference, model_dir):
    from swiftdiffusion_client import Client

    reqs = [
        GenerationRequest(
            prompt="a red house", seed=5, steps=4, controlnet_names=("edges",), controlnet_images=hint_images(1)
        ),
        GenerationRequest(
            prompt="a blue house",
            seed=6,
            steps=4,
            controlnet_names=("edges", "depth"),
            controlnet_images=hint_images(2, seed=3),
            controlnet_scales=(1.2, 0.5),
            controlnet_guidance_start=(0.0, 0.25),
        ),
    ]
    default_server.trace_file.write_text("")
    with Client(default_server.grpc_url, timeout_s=120) as inline:
        for req in reqs:
            image = inline.generate(req)
            assert_same_image(image, diffusers_controlnet_image(reference, model_dir, req))
            assert_same_image(image, client.generate(req))  # the service's image
    events = [json.loads(line)["event"] for line in default_server.trace_file.read_text().splitlines()]
    service_steps = "unet_controlnet_sent" in events or "controlnet_step_start" in events
    # What the layout in use promises: the cpu layout runs ControlNets in denoise (no service step); on CUDA the
    # default server renders 1gpu, whose unet calls the service every step.
    assert service_steps == on_cuda()
    assert not _hint_files()
