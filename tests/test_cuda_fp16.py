"""fp16 on CUDA against diffusers' own fp16 pipelines (runs only where CUDA is; the device check's tests step).

Both sides start from the same noise: ``denoise`` draws it in float32 on the CPU from the request's seed, and the
diffusers pipeline gets that draw as ``latents=`` (in fp16, as its fp16 pipeline holds latents), so no result
depends on how torch's CPU half ``randn`` draws. fp16 results still depend on kernel choice, so the tolerance is
measured in the same run: the noise floor is the difference between diffusers' fp16 image of a request generated
alone and in a batch of two (other kernels, same math). Each case must stay within twice that floor plus a margin,
on the mean and on the worst pixel. Every number is printed and recorded in the JUnit XML (``record_property``),
so the first CUDA run reports them. Cases: plain, a LoRA (fused by diffusers), a ControlNet, SDXL.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from swiftdiffusion_client import Client, GenerationRequest

from triton_backend.serving.repository import Layout, Pipeline, render

from .helpers import hint_images, pixel_diff, start_server

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the device check runs it)"),
]

#: Levels above twice the measured floor a case may differ by: on the mean, and at the worst pixel.
MEAN_MARGIN, MAX_MARGIN = 1.0, 24

PLAIN = [GenerationRequest(prompt=p, seed=s, steps=8) for p, s in (("a red barn", 1), ("a cat", 7))]
CASES = {
    "plain": PLAIN[0],
    "lora": dataclasses.replace(PLAIN[0], lora_names=("pastel_peft",), lora_bound_k=0),
    "controlnet": dataclasses.replace(PLAIN[1], controlnet_names=("edges",), controlnet_images=hint_images(1)),
}


def noise(request: GenerationRequest, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The request's starting noise as ``denoise`` draws it (float32, CPU generator), as diffusers' fp16 latents."""
    draw = torch.randn(latent_shape, generator=torch.Generator("cpu").manual_seed(request.seed), dtype=torch.float32)
    return draw.to("cuda", torch.float16)


def uint8(images: np.ndarray) -> list[np.ndarray]:
    return [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]


def fp16_images(pipe, requests: list[GenerationRequest], **kwargs) -> list[np.ndarray]:
    """``pipe`` (fp16, CUDA) on ``requests`` in one batch, each from its own float32-drawn noise, with the
    scheduler the server builds for the first request.
    """
    from triton_backend.schedulers import make_scheduler

    pipe.scheduler = make_scheduler(requests[0].scheduler, pipe.scheduler, seed=requests[0].seed)
    size = pipe.unet.config.sample_size
    latents = torch.cat([noise(r, (1, pipe.unet.config.in_channels, size, size)) for r in requests])
    out = pipe(
        [r.prompt for r in requests],
        negative_prompt=[r.negative_prompt for r in requests],
        guidance_scale=requests[0].guidance_scale,  # (SDXL's pipeline defaults to 5.0, the request to 7.5)
        num_inference_steps=requests[0].steps,
        latents=latents,
        output_type="np",
        **kwargs,
    ).images
    return uint8(out)


def noise_floor(pipe, name: str, record_property) -> tuple[list[np.ndarray], tuple[int, float]]:
    """``pipe``'s images of :data:`PLAIN` generated alone, and the (max, mean) difference to the same in one batch."""
    alone = [fp16_images(pipe, [r])[0] for r in PLAIN]
    floors = [pixel_diff(a, b) for a, b in zip(alone, fp16_images(pipe, PLAIN), strict=True)]
    floor = (max(f[0] for f in floors), max(f[1] for f in floors))
    record_property(name, f"max {floor[0]} mean {floor[1]:.3f}")
    return alone, floor


def served(model_dir, tmp_path, requests: list[GenerationRequest]) -> list[np.ndarray]:
    """Our images of ``requests`` from the ``1gpu`` layout in fp16."""
    layout = Layout.named("1gpu", "float16")
    repo = render(tmp_path / "repo", [Pipeline("txt2img", model_dir)], layout, stage_prefix="", load_stages=False)
    srv = start_server(model_dir, tmp_path, model_repository=repo)
    try:
        with Client(srv.grpc_url, timeout_s=180) as c:
            return [c.generate(r) for r in requests]
    finally:
        srv.stop()


def check(name: str, ours: np.ndarray, theirs: np.ndarray, floor: tuple[int, float], record_property) -> None:
    worst, mean = pixel_diff(ours, theirs)
    print(f"fp16 {name}: ours vs diffusers max {worst} mean {mean:.3f} (floor max {floor[0]} mean {floor[1]:.3f})")
    record_property(f"fp16_{name}", f"max {worst} mean {mean:.3f}")
    assert mean <= 2 * floor[1] + MEAN_MARGIN, f"{name}: mean diff {mean:.3f}, floor {floor[1]:.3f}"
    assert worst <= 2 * floor[0] + MAX_MARGIN, f"{name}: max diff {worst}, floor {floor[0]}"


def test_sd_fp16_equals_diffusers_fp16_within_its_own_noise_floor(model_dir, tmp_path, record_property):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), torch_dtype=torch.float16, safety_checker=None, requires_safety_checker=False
    ).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    alone, floor = noise_floor(pipe, "fp16_noise_floor", record_property)
    theirs = {"plain": alone[0]}
    # (the ControlNet case before the LoRA's: fusing and unfusing in fp16 does not restore the weights exactly)
    net = ControlNetModel.from_pretrained(str(model_dir / "controlnets" / "edges"), torch_dtype=torch.float16)
    control = StableDiffusionControlNetPipeline(**pipe.components, controlnet=net.to("cuda"))
    control.set_progress_bar_config(disable=True)
    hint = Image.fromarray(CASES["controlnet"].controlnet_images[0])
    controlnet_image = fp16_images(control, [CASES["controlnet"]], image=hint)[0]
    pipe.load_lora_weights(str(model_dir / "loras" / "pastel_peft.safetensors"), adapter_name="pastel_peft")
    pipe.fuse_lora()
    theirs["lora"] = fp16_images(pipe, [CASES["lora"]])[0]
    theirs["controlnet"] = controlnet_image

    ours = served(model_dir, tmp_path, list(CASES.values()))
    for (name, theirs_image), ours_image in zip(theirs.items(), ours, strict=True):
        check(name, ours_image, theirs_image, floor, record_property)


def test_sdxl_fp16_equals_diffusers_fp16_within_its_own_noise_floor(sdxl_model_dir, tmp_path, record_property):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(sdxl_model_dir), torch_dtype=torch.float16, add_watermarker=False
    ).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    alone, floor = noise_floor(pipe, "fp16_sdxl_noise_floor", record_property)
    ours = served(sdxl_model_dir, tmp_path, PLAIN)
    for i, (o, a) in enumerate(zip(ours, alone, strict=True)):
        check(f"sdxl_{i}", o, a, floor, record_property)
