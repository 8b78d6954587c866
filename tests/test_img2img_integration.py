"""img2img, inpainting and NUM_IMAGES over gRPC on the real tritonserver: equal to stock diffusers and to single
requests; bad input refused naming its field while the server keeps serving; the CLI writes one PNG per image.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from PIL import Image
from swiftdiffusion_client import Client, GenerationRequest, InvalidArgumentError

from .helpers import BIN, assert_same_image, pixel_diff
from .test_img2img import diffusers_image, init_image, mask_image, request

pytestmark = pytest.mark.integration


@pytest.fixture()
def cpu_client(default_server):
    """A client of the cpu layout (``serve``'s): the stages img2img calls are text_encoder, denoise, vae."""
    with Client(default_server.grpc_url, timeout_s=120) as c:
        yield c


@pytest.mark.parametrize("fields", [{"strength": 0.5}, {"mask_image": mask_image()}])
def test_img2img_over_grpc_equals_diffusers_in_both_layouts(cpu_client, client, model_dir, fields):
    req = request(**fields)
    expected = diffusers_image(model_dir, req)
    for c in (cpu_client, client):  # (cpu layout; split layout: the UNet in its own model)
        result = c.run(req)
        assert result.images.shape == (1, 64, 64, 3)
        assert_same_image(result.image, expected)


def test_n_images_over_grpc_equal_single_requests_and_image_is_the_first(cpu_client):
    req = GenerationRequest(prompt="a lighthouse", seed=21, steps=4, num_images=3)
    images = cpu_client.generate(req)
    assert isinstance(images, list) and len(images) == 3
    raw = cpu_client.infer_raw(req.to_tensors())
    assert raw["IMAGES"].shape == (3, 64, 64, 3) and np.array_equal(raw["IMAGE"], raw["IMAGES"][0])
    for i, image in enumerate(images):
        alone = cpu_client.generate(GenerationRequest(prompt="a lighthouse", seed=21 + i, steps=4))
        assert_same_image(image, alone)
    img2img = request(num_images=2, strength=0.6)
    pair = cpu_client.generate(img2img)
    assert_same_image(pair[1], cpu_client.generate(request(seed=img2img.seed + 1, strength=0.6)))


def test_img2img_stream_counts_the_steps_strength_leaves_and_ends_with_the_same_image(cpu_client):
    req = request(strength=0.5, steps=8, mask_image=mask_image())
    events = list(cpu_client.stream(req, preview_every=2))
    steps, final = events[:-1], events[-1]
    assert [e.step for e in steps] == [1, 2, 3, 4] and {e.total_steps for e in steps} == {4}
    assert sum(e.preview is not None for e in steps) == 1  # (steps 2; step 4 is the last: no preview)
    assert np.array_equal(final.image, cpu_client.generate(req))


def _img2img_inputs(**override):
    inputs = request(steps=2).to_tensors()
    inputs.update(override)
    return {k: v for k, v in inputs.items() if v is not None}


BAD = [
    ("STRENGTH", {"STRENGTH": np.array([0.0], np.float32)}),
    ("STRENGTH", {"STRENGTH": np.array([1.5], np.float32)}),
    ("STRENGTH", {"STRENGTH": np.array([np.nan], np.float32)}),
    ("STRENGTH", {"STRENGTH": np.array([0.1], np.float32)}),  # (no step left of 2)
    ("INIT_IMAGE", {"INIT_IMAGE": None}),
    ("INIT_IMAGE", {"INIT_IMAGE": np.zeros((60, 64, 3), np.uint8)}),
    ("INIT_IMAGE", {"INIT_IMAGE": np.zeros((2056, 2048, 3), np.uint8)}),  # above max_image_bytes
    ("NUM_IMAGES", {"NUM_IMAGES": np.array([0], np.int32)}),
    ("NUM_IMAGES", {"NUM_IMAGES": np.array([9], np.int32)}),
    ("MASK_IMAGE", {"MASK_IMAGE": np.zeros((32, 32), np.uint8)}),
    ("HEIGHT", {"HEIGHT": np.array([128], np.int32)}),
]


@pytest.mark.parametrize(("field", "override"), BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_img2img_input_is_refused_naming_the_field_and_the_server_keeps_serving(cpu_client, field, override):
    with pytest.raises(InvalidArgumentError) as info:
        cpu_client.infer_raw(_img2img_inputs(**override), model="img2img")
    assert field in info.value.message
    good = request(steps=3, strength=0.7)
    assert_same_image(cpu_client.generate(good), cpu_client.generate(good))


def test_txt2img_refuses_img2img_fields_by_name(cpu_client):
    inputs = GenerationRequest(prompt="x", steps=2).to_tensors() | {"STRENGTH": np.array([0.5], np.float32)}
    with pytest.raises(InvalidArgumentError, match="STRENGTH"):
        cpu_client.infer_raw(inputs)


def test_cli_img2img_with_a_mask_writes_one_png_per_image(default_server, tmp_path):
    Image.fromarray(init_image((72, 70))).save(tmp_path / "in.png")  # (cut to 72x64: multiples of 8)
    Image.fromarray(mask_image((72, 70))).save(tmp_path / "mask.png")
    out = subprocess.run(
        [
            str(BIN),
            "generate",
            "--url",
            default_server.grpc_url,
            "--prompt",
            "a boat",
            "--steps",
            "4",
            "--seed",
            "3",
            "--init-image",
            str(tmp_path / "in.png"),
            "--mask",
            str(tmp_path / "mask.png"),
            "--strength",
            "0.75",
            "--num-images",
            "2",
            "-o",
            str(tmp_path / "boat.png"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "boat-0.png .. " in out.stdout and "seeds 3..4" in out.stdout
    first, second = (np.asarray(Image.open(tmp_path / f"boat-{i}.png")) for i in range(2))
    assert first.shape == (72, 64, 3) and pixel_diff(first, second)[1] > 0.5
    bad = subprocess.run(
        [str(BIN), "generate", "--url", default_server.grpc_url, "--prompt", "x", "--mask", str(tmp_path / "mask.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--mask needs --init-image" in bad.stderr
