"""SDXL through ``txt2img`` on the real server (same model repository, SDXL model directory) against diffusers."""

from __future__ import annotations

import shutil
from contextlib import contextmanager

import numpy as np
import pytest
from swiftdiffusion_client import Client, GenerationRequest, InvalidArgumentError

from .helpers import (
    assert_rejected_then_served,
    assert_same_image,
    generate_concurrently,
    hint_images,
    lora_request,
    start_server,
)

pytestmark = pytest.mark.integration

MICRO = dict(original_size=(32, 40), crops_coords_top_left=(4, 8), target_size=(48, 48))


@contextmanager
def borrowed_adapters(source, target, lora: tuple[str, str], controlnet: tuple[str, str]):
    """Copy a LoRA and a ControlNet of ``source``'s model into ``target``'s stores under new names (servable at
    once: the stores are read per request), and remove them again.
    """
    lora_file = target / "loras" / f"{lora[1]}.safetensors"
    cn_dir = target / "controlnets" / controlnet[1]
    shutil.copy(source / "loras" / f"{lora[0]}.safetensors", lora_file)
    shutil.copytree(source / "controlnets" / controlnet[0], cn_dir)
    try:
        yield
    finally:
        lora_file.unlink()
        shutil.rmtree(cn_dir)


@pytest.mark.parametrize(
    "fields",
    [
        dict(prompt="a photo of a cat"),  # no negative prompt: zero negative embeddings (force_zeros_for_empty_prompt)
        dict(prompt="a red house", negative_prompt="blurry", scheduler="euler_a", guidance_scale=5.0, **MICRO),
        dict(prompt="a castle", guidance_scale=1.0, height=48, width=96, scheduler="ddim"),
        dict(prompt="a cat", prompt_2="a watercolor", negative_prompt="dark", negative_prompt_2="blurry"),
    ],
)
def test_txt2img_equals_stable_diffusion_xl_pipeline(sdxl_client, sdxl_reference, fields):
    req = GenerationRequest(seed=7, steps=4, **fields)
    assert_same_image(sdxl_client.generate(req), sdxl_reference(req))


def test_controlnets_equal_stable_diffusion_xl_controlnet_pipeline(sdxl_client, sdxl_reference):
    one = GenerationRequest(
        prompt="a tree", seed=3, steps=4, controlnet_names=("edges",), controlnet_images=hint_images(1)
    )
    two = GenerationRequest(
        prompt="a tree",
        negative_prompt="ugly",
        seed=3,
        steps=4,
        controlnet_names=("depth", "edges"),
        controlnet_images=hint_images(2, seed=1),
        controlnet_scales=(1.2, 0.6),
        controlnet_guidance_start=(0.0, 0.3),
        controlnet_guidance_end=(0.8, 1.0),
        **MICRO,
    )
    for req in (one, two):
        assert_same_image(sdxl_client.generate(req), sdxl_reference(req))


@pytest.mark.parametrize(
    "loras", [(("pastel_peft", 1.0),), (("ink_kohya", 0.7), ("glow_kohya", -0.5))], ids=["peft", "kohya-two"]
)
def test_loras_at_k0_equal_diffusers_fuse_lora(sdxl_client, sdxl_reference, loras):
    req = lora_request(loras)
    result = sdxl_client.run(req)
    assert result.lora_landed_step == 0
    assert_same_image(result.image, sdxl_reference(req))


def test_concurrent_mixed_requests_each_equal_their_reference(sdxl_server, sdxl_reference):
    """Rows of different requests (different time ids, LoRA sets, ControlNets) share unet passes; none leaks."""
    requests = [
        GenerationRequest(prompt="a cat", seed=1, steps=4),
        GenerationRequest(prompt="a dog", seed=2, steps=4, **MICRO),
        GenerationRequest(prompt="a car", seed=3, steps=4, lora_names=("ink_kohya",), lora_bound_k=0),
        GenerationRequest(
            prompt="a tree", seed=4, steps=4, controlnet_names=("edges",), controlnet_images=hint_images(1)
        ),
    ]
    for req, image in zip(requests, generate_concurrently(sdxl_server.grpc_url, requests), strict=True):
        assert_same_image(image, sdxl_reference(req))


def test_adapters_of_the_other_architecture_are_refused_and_the_server_keeps_serving(
    sdxl_client, sdxl_reference, model_dir, sdxl_model_dir
):
    with borrowed_adapters(model_dir, sdxl_model_dir, ("ink_kohya", "sd15_ink"), ("edges", "sd15_edges")):
        assert_rejected_then_served(
            sdxl_client,
            sdxl_reference,
            {"LORA_NAMES": np.array([b"sd15_ink"], dtype=object), "LORA_BOUND_K": np.array([0], dtype=np.int32)},
            InvalidArgumentError,
            "sd15_ink: a LoRA for another architecture",
        )
        assert_rejected_then_served(
            sdxl_client,
            sdxl_reference,
            {
                "CONTROLNET_NAMES": np.array([b"sd15_edges"], dtype=object),
                "CONTROLNET_IMAGES": hint_images(1),
            },
            InvalidArgumentError,
            "sd15_edges: an SD1.x/2.x ControlNet",
        )


def test_sdxl_adapters_and_fields_on_the_sd_server_are_refused(client, reference, model_dir, sdxl_model_dir):
    with borrowed_adapters(sdxl_model_dir, model_dir, ("glow_kohya", "xl_glow"), ("edges", "xl_edges")):
        assert_rejected_then_served(
            client,
            reference,
            {"LORA_NAMES": np.array([b"xl_glow"], dtype=object)},
            InvalidArgumentError,
            "xl_glow: has text_encoder_2 layers (an SDXL LoRA)",
        )
        assert_rejected_then_served(
            client,
            reference,
            {"CONTROLNET_NAMES": np.array([b"xl_edges"], dtype=object), "CONTROLNET_IMAGES": hint_images(1)},
            InvalidArgumentError,
            "xl_edges: an SDXL ControlNet",
        )
        assert_rejected_then_served(
            client,
            reference,
            {"ORIGINAL_SIZE": np.array([64, 64], dtype=np.int32)},
            InvalidArgumentError,
            "ORIGINAL_SIZE: is SDXL micro-conditioning",
        )
        assert_rejected_then_served(
            client,
            reference,
            {"PROMPT_2": np.array([b"a sketch"], dtype=object)},
            InvalidArgumentError,
            "PROMPT_2: is the second text encoder's prompt of SDXL models",
        )


def test_bad_micro_conditioning_is_rejected_naming_the_field(sdxl_client, sdxl_reference):
    assert_rejected_then_served(
        sdxl_client,
        sdxl_reference,
        {"TARGET_SIZE": np.array([64, 64, 3], dtype=np.int32)},
        InvalidArgumentError,
        "TARGET_SIZE: expected 2 values",
    )


def test_baseline_serves_sdxl_like_diffusers(sdxl_model_dir, sdxl_reference, tmp_path_factory):
    from triton_backend.paths import baseline_repository_dir

    srv = start_server(
        sdxl_model_dir, tmp_path_factory.mktemp("baseline-sdxl"), model_repository=baseline_repository_dir()
    )
    try:
        with Client(srv.grpc_url, timeout_s=300) as c:
            for req in (
                GenerationRequest(prompt="a cat", seed=2, steps=4, **MICRO),
                GenerationRequest(
                    prompt="a tree",
                    seed=5,
                    steps=4,
                    lora_names=("glow_kohya",),
                    controlnet_names=("edges",),
                    controlnet_images=hint_images(1),
                ),
            ):
                ref = GenerationRequest(**{**req.__dict__, "lora_bound_k": 0}) if req.lora_names else req
                assert_same_image(c.generate(req), sdxl_reference(ref))
    finally:
        srv.stop()
