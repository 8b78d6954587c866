"""img2img, inpainting and several images per request, in process, against stock diffusers: the img2img and
inpainting pipelines of SD and SDXL (with a ControlNet, with a LoRA, on a 4- and a 9-channel UNet), and n images
equal to n single requests seeded SEED + i.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from triton_backend.errors import InvalidRequestError
from triton_backend.pipeline import LocalPipeline
from triton_backend.schedulers import make_scheduler
from triton_backend.schema import GenerationRequest

from .helpers import assert_same_image, hint_images, pipeline_image, pixel_diff


def init_image(size: tuple[int, int] = (64, 64), seed: int = 5) -> np.ndarray:
    """A smooth picture with some texture (what img2img starts from)."""
    h, w = size
    yy, xx = np.indices((h, w)) / max(h, w)
    noise = np.random.default_rng(seed).integers(0, 40, (h, w, 3))
    rgb = np.stack([200 * xx + 30, 160 * yy + 50, 120 * (1 - xx * yy) + 60], axis=-1) + noise
    return rgb.clip(0, 255).astype(np.uint8)


def mask_image(size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """255 (repaint) on a centre square, 0 (keep) elsewhere."""
    h, w = size
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    return mask


def request(**fields) -> GenerationRequest:
    base = dict(prompt="a house by a lake", negative_prompt="blurry", seed=7, steps=6, init_image=init_image())
    return GenerationRequest(**(base | fields))


def diffusers_image(model_dir: Path, req: GenerationRequest, controlnet: bool = False) -> np.ndarray:
    """The request through the stock diffusers pipeline it stands for, built from the model directory."""
    import diffusers
    from PIL import Image

    sdxl = (model_dir / "text_encoder_2").is_dir()
    kind = "Inpaint" if req.mask_image is not None else "Img2Img"
    name = f"StableDiffusion{'XL' if sdxl else ''}{'ControlNet' if controlnet else ''}{kind}Pipeline"
    extra: dict = {"add_watermarker": False} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    if controlnet:
        extra["controlnet"] = diffusers.ControlNetModel.from_pretrained(
            str(model_dir / "controlnets" / req.controlnet_names[0])
        )
    pipe = getattr(diffusers, name).from_pretrained(str(model_dir), **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(req.scheduler, pipe.scheduler, seed=req.seed)
    kwargs: dict = {"image": Image.fromarray(req.init_image)}
    if req.mask_image is not None:
        h, w = req.init_image.shape[:2]
        kwargs |= {"mask_image": Image.fromarray(req.mask_image), "height": h, "width": w}
    if controlnet:
        name, scale, start, end = req.controlnets[0]  # (the ControlNet img2img pipelines' default scale is 0.8)
        kwargs |= {"control_image": Image.fromarray(req.controlnet_images[0]), "controlnet_conditioning_scale": scale,
                   "control_guidance_start": start, "control_guidance_end": end}  # fmt: skip
    if req.strength is not None:
        kwargs["strength"] = req.strength
    for name, scale in req.loras:
        pipe.load_lora_weights(str(model_dir / "loras" / f"{name}.safetensors"), adapter_name=name)
        pipe.set_adapters([name], adapter_weights=[scale])
        pipe.fuse_lora(adapter_names=[name])
    return pipeline_image(pipe, req, **kwargs)


@pytest.fixture(scope="module")
def inpainting_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from triton_backend.tools.default_model import write_default_model

    return write_default_model(tmp_path_factory.mktemp("models") / "inpainting", inpainting=True)


@pytest.fixture(scope="module")
def xl(sdxl_model_dir):
    pipe = LocalPipeline(sdxl_model_dir)
    yield pipe
    pipe.close()


@pytest.mark.parametrize(
    "fields",
    [{}, {"strength": 0.5}, {"strength": 1.0}, {"strength": 0.5, "scheduler": "euler_a"}, {"guidance_scale": 1.0}],
)
def test_img2img_equals_stable_diffusion_img2img_pipeline(local, model_dir, fields):
    req = request(**fields)
    assert_same_image(local.generate(req).image, diffusers_image(model_dir, req))


def test_img2img_runs_the_steps_strength_leaves_and_keeps_the_image_at_low_strength(local):
    from triton_backend.stages import denoise

    req = request(strength=0.5, steps=10)
    encoded = local.text_encoder.encode_request(req) | local.vae.encode(req.init_image)
    assert len(denoise.prepare_encoded(req, encoded, local.info).timesteps) == 5
    low = local.generate(request(strength=0.1, steps=10)).image
    high = local.generate(request(strength=1.0, steps=10)).image
    assert pixel_diff(low, req.init_image)[1] < pixel_diff(high, req.init_image)[1]


@pytest.mark.parametrize("fields", [{}, {"strength": 0.6}, {"strength": 0.6, "scheduler": "euler_a"}])
def test_inpainting_on_a_4_channel_unet_equals_stable_diffusion_inpaint_pipeline(local, model_dir, fields):
    req = request(mask_image=mask_image(), **fields)
    ours = local.generate(req).image
    assert_same_image(ours, diffusers_image(model_dir, req))
    kept = mask_image() == 0
    assert pixel_diff(ours[kept], req.init_image[kept])[1] < pixel_diff(ours[~kept], req.init_image[~kept])[1]


@pytest.mark.parametrize("fields", [{}, {"strength": 0.6}])
def test_inpainting_on_a_9_channel_unet_equals_stable_diffusion_inpaint_pipeline(inpainting_model_dir, fields):
    pipe = LocalPipeline(inpainting_model_dir)
    try:
        req = request(mask_image=mask_image(), **fields)
        assert_same_image(pipe.generate(req).image, diffusers_image(inpainting_model_dir, req))
        no_mask = dataclasses.replace(req, mask_image=None)
        no_image = dataclasses.replace(req, init_image=None, mask_image=None, strength=None)
        for bad, field in ((no_mask, "MASK_IMAGE"), (no_image, "INIT_IMAGE")):
            with pytest.raises(InvalidRequestError) as info:
                pipe.generate(bad)
            assert info.value.field == field
    finally:
        pipe.close()


def test_a_controlnet_on_a_9_channel_unet_equals_the_controlnet_inpaint_pipeline(inpainting_model_dir):
    """The ControlNet takes the 4 latent channels; the UNet the latents, the mask and the masked image."""
    pipe = LocalPipeline(inpainting_model_dir)
    try:
        req = request(mask_image=mask_image(), controlnet_names=("edges",), controlnet_images=hint_images(1))
        ours = pipe.generate(req).image
        assert_same_image(ours, diffusers_image(inpainting_model_dir, req, controlnet=True))
        plain = pipe.generate(dataclasses.replace(req, controlnet_names=(), controlnet_images=None)).image
        assert pixel_diff(ours, plain)[1] > 0.5
    finally:
        pipe.close()


def test_img2img_with_a_controlnet_and_a_lora_equals_the_controlnet_img2img_pipeline(local, model_dir):
    name = sorted(p.name for p in (model_dir / "controlnets").iterdir())[0]
    lora = sorted(p.stem for p in (model_dir / "loras").glob("*.safetensors"))[0]
    req = request(
        strength=0.7,
        controlnet_names=(name,),
        controlnet_images=hint_images(1),
        lora_names=(lora,),
        lora_scales=(0.8,),
        lora_bound_k=0,
    )
    assert_same_image(local.generate(req).image, diffusers_image(model_dir, req, controlnet=True))


@pytest.mark.parametrize(
    "fields", [{}, {"strength": 0.6}, {"mask_image": mask_image()}, {"mask_image": mask_image(), "strength": 0.5}]
)
def test_sdxl_img2img_and_inpainting_equal_their_pipelines(xl, sdxl_model_dir, fields):
    req = request(**fields)
    assert_same_image(xl.generate(req).image, diffusers_image(sdxl_model_dir, req))


@pytest.mark.parametrize(
    "fields",
    [
        {"init_image": None},
        {"init_image": None, "scheduler": "euler_a"},
        {"strength": 0.5},
        {"mask_image": mask_image(), "strength": 0.7},
    ],
)
def test_n_images_equal_n_single_requests_seeded_seed_plus_i(local, fields):
    req = request(num_images=3, **fields)
    images = local.generate(req).images
    assert images.shape == (3, 64, 64, 3)
    for i in range(3):
        alone = local.generate(dataclasses.replace(req, num_images=1, seed=req.seed + i)).image
        assert_same_image(images[i], alone)
    assert pixel_diff(images[0], images[1])[1] > 1  # (different seeds, different images)


def test_n_images_equal_diffusers_with_a_generator_per_image(local, reference):
    req = GenerationRequest(prompt="a red car", seed=11, steps=5, num_images=3)
    reference.pipe.scheduler = make_scheduler(req.scheduler, reference.base_scheduler, seed=req.seed)
    out = reference.pipe(
        req.prompt,
        num_inference_steps=req.steps,
        num_images_per_prompt=3,
        generator=[torch.Generator("cpu").manual_seed(req.seed + i) for i in range(3)],
        output_type="np",
    ).images
    for ours, theirs in zip(local.generate(req).images, out, strict=True):
        assert_same_image(ours, (theirs * 255).round().astype(np.uint8))


def test_controlnet_inpainting_equals_the_controlnet_inpaint_pipeline(local, model_dir):
    name = sorted(p.name for p in (model_dir / "controlnets").iterdir())[0]
    req = request(mask_image=mask_image(), strength=0.8, controlnet_names=(name,), controlnet_images=hint_images(1))
    assert_same_image(local.generate(req).image, diffusers_image(model_dir, req, controlnet=True))


def test_sdxl_img2img_with_a_lora_equals_its_pipeline(xl, sdxl_model_dir):
    lora = sorted(p.stem for p in (sdxl_model_dir / "loras").glob("*.safetensors"))[0]
    req = request(strength=0.6, lora_names=(lora,), lora_scales=(0.9,), lora_bound_k=0)
    assert_same_image(xl.generate(req).image, diffusers_image(sdxl_model_dir, req))


def test_sdxl_controlnet_img2img_takes_its_pipelines_default_strength(xl, sdxl_model_dir):
    name = sorted(p.name for p in (sdxl_model_dir / "controlnets").iterdir())[0]
    req = request(controlnet_names=(name,), controlnet_images=hint_images(1))  # (0.8 here, 0.3 without it)
    assert_same_image(xl.generate(req).image, diffusers_image(sdxl_model_dir, req, controlnet=True))


def test_strength_counts_steps_as_the_decimal_the_client_sent(local):
    """FP32 0.9 is 0.8999999762; diffusers' ``int(10 * 0.9)`` is 9 steps, and so is ours."""
    from triton_backend.schema import parse_request
    from triton_backend.stages import denoise

    req = parse_request(request(strength=0.9, steps=10).to_tensors())
    assert req.strength == 0.9
    encoded = local.text_encoder.encode_request(req) | local.vae.encode(req.init_image)
    assert len(denoise.prepare_encoded(req, encoded, local.info).timesteps) == 9


def test_strength_too_small_for_the_steps_is_refused_naming_strength(local):
    with pytest.raises(InvalidRequestError) as info:
        local.generate(request(strength=0.1, steps=5))
    assert info.value.field == "STRENGTH" and "no step" in str(info.value)
    with pytest.raises(InvalidRequestError) as info:
        local.generate(request(init_image=None, strength=0.5))
    assert info.value.field == "STRENGTH"
