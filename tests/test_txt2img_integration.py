"""txt2img over gRPC against the real bundled tritonserver equals diffusers in-process."""

from __future__ import annotations

import numpy as np
import pytest
from swiftdiffusion_client import Client, ClientError, GenerationRequest, InvalidArgumentError

from .helpers import assert_rejected_then_served, assert_same_image, generate_concurrently, optional_sampler, pixel_diff

pytestmark = pytest.mark.integration


#: Over gRPC, one sampler of each kind (tests/test_schedulers.py checks every table entry in-process): the model's
#: own, the originals, ancestral, two-evaluation (Heun), Karras, SDE, scipy's LMS, and an A1111 spelling.
SCHEDULERS = ["default", "euler", "euler_a", "ddim", "dpmpp_2m", "pndm", "unipc", "heun", "dpmpp_2m_karras"]
SCHEDULERS += ["dpmpp_sde_karras", "dpmpp_2m_sde", "lms", "DPM++ 2M Karras"]


@pytest.mark.parametrize("scheduler", [optional_sampler(name) for name in SCHEDULERS])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_txt2img_equals_diffusers(client, reference, scheduler, guidance):
    req = GenerationRequest(
        prompt="a photo of a cat",
        negative_prompt="blurry",
        seed=11,
        steps=4,
        guidance_scale=guidance,
        scheduler=scheduler,
    )
    assert_same_image(client.generate(req), reference(req))


def test_defaults_and_sizes_equal_diffusers(client, reference):
    req = GenerationRequest(prompt="an old castle in the snow")
    image = client.generate(req)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert_same_image(image, reference(req))
    req = GenerationRequest(prompt="a river", seed=2, steps=3, height=48, width=80, scheduler="ddim")
    image = client.generate(req)
    assert image.shape == (48, 80, 3)
    assert_same_image(image, reference(req))


def test_seed_determinism(client):
    req = GenerationRequest(prompt="a dog", seed=123, steps=4)
    a, b = client.generate(req), client.generate(req)
    assert np.array_equal(a, b)
    c = client.generate(GenerationRequest(prompt="a dog", seed=124, steps=4))
    assert pixel_diff(a, c)[1] >= 2.0


BAD = [
    ("PROMPT", {"PROMPT": np.array([b""], dtype=object)}),
    ("STEPS", {"STEPS": np.array([0], dtype=np.int32)}),
    ("STEPS", {"STEPS": np.array([100000], dtype=np.int32)}),
    ("HEIGHT", {"HEIGHT": np.array([63], dtype=np.int32)}),
    ("WIDTH", {"WIDTH": np.array([1 << 20], dtype=np.int32)}),
    ("SCHEDULER", {"SCHEDULER": np.array([b"warp_drive"], dtype=object)}),
    ("GUIDANCE_SCALE", {"GUIDANCE_SCALE": np.array([np.inf], dtype=np.float32)}),
    ("PROMPT", {"PROMPT": np.array([b"\xff\xfe"], dtype=object)}),
]


@pytest.mark.parametrize("field,override", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_input_is_invalid_arg_naming_the_field_and_server_keeps_serving(client, reference, field, override):
    assert_rejected_then_served(client, reference, override, InvalidArgumentError, field)


@pytest.mark.parametrize(
    "inputs,needle",
    [
        ({"SEED": np.array([1], dtype=np.int64)}, "PROMPT"),  # missing required input
        ({"PROMPT": np.array([b"a"], dtype=object), "STEPS": np.array([2.0], dtype=np.float32)}, "STEPS"),
        ({"PROMPT": np.array([b"a", b"b"], dtype=object)}, "PROMPT"),  # wrong shape
    ],
)
def test_wrong_dtype_shape_or_missing_input_is_invalid(client, inputs, needle):
    with pytest.raises(InvalidArgumentError) as info:
        client.infer_raw(inputs)
    assert needle in info.value.message
    assert client.generate(GenerationRequest(prompt="still serving", steps=1)).shape == (64, 64, 3)


def test_concurrent_requests_each_get_their_own_result(server, reference):
    requests = [
        GenerationRequest(prompt=p, seed=s, steps=n, scheduler=k, guidance_scale=g)
        for p, s, n, k, g in [
            ("a cat", 1, 4, "euler", 7.5),
            ("a dog", 2, 3, "ddim", 5.0),
            ("a tree", 3, 5, "euler_a", 7.5),
            ("a house", 4, 2, "dpmpp_2m", 1.0),
            ("a horse", 5, 4, "unipc", 3.0),
            ("the moon", 6, 6, "pndm", 7.5),
            ("a car", 7, 3, "default", 7.5),
            ("red sky", 8, 4, "euler", 9.0),
        ]
    ]

    images = generate_concurrently(server.grpc_url, requests)
    for req, image in zip(requests, images, strict=True):
        assert_same_image(image, reference(req))


def test_stages_are_callable_on_their_own(client, reference):
    req = GenerationRequest(prompt="a photo of a cat", seed=9, steps=3)
    embeds = client.infer_raw({"PROMPT": np.array([b"a photo of a cat"], dtype=object)}, model="text_encoder")
    assert embeds["PROMPT_EMBEDS"].shape == (2, 77, 32)
    latents = client.infer_raw(
        {
            "PROMPT_EMBEDS": embeds["PROMPT_EMBEDS"],
            "SEED": np.array([9], dtype=np.int64),
            "STEPS": np.array([3], dtype=np.int32),
        },
        model="denoise",
    )["LATENTS"]
    assert latents.shape == (1, 4, 8, 8)
    image = client.infer_raw({"LATENTS": latents}, model="vae")["IMAGES"][0]
    assert_same_image(image, reference(req))
    noise = client.infer_raw(
        {
            "SAMPLE": np.zeros((2, 4, 8, 8), np.float32),
            "TIMESTEP": np.array([[10.0], [900.0]], np.float32),
            "ENCODER_HIDDEN_STATES": embeds["PROMPT_EMBEDS"],
        },
        model="unet",
    )["NOISE_PRED"]
    assert noise.shape == (2, 4, 8, 8) and not np.allclose(noise[0], noise[1])


def test_stage_errors_are_invalid_arg(client):
    with pytest.raises(InvalidArgumentError, match="LATENTS"):
        client.infer_raw({"LATENTS": np.zeros((1, 3, 8, 8), np.float32)}, model="vae")
    with pytest.raises(InvalidArgumentError, match="PROMPT_EMBEDS"):
        client.infer_raw({"PROMPT_EMBEDS": np.zeros((1, 77, 32), np.float32)}, model="denoise")


def test_unknown_model_is_a_typed_error(server):
    with Client(server.grpc_url, model="nope") as c, pytest.raises(ClientError):
        c.generate(GenerationRequest(prompt="x"))
