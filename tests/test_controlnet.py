"""ControlNet-as-a-Service in-process: split UNet, service, and equality with diffusers' ControlNet pipelines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from triton_backend.config import StageConfig
from triton_backend.controlnet.service import ControlNetService
from triton_backend.controlnet.unet_split import decoder_half, encoder_half, pack_residuals, unpack_residuals
from triton_backend.errors import InvalidRequestError, NotFoundError
from triton_backend.schema import GenerationRequest
from triton_backend.stages import denoise

from .helpers import assert_same_image, diffusers_controlnet_image, hint_images, pixel_diff


def generate(local, req):
    state = denoise.prepare_encoded(req, local.text_encoder.encode_request(req), local.info)
    try:
        if req.controlnet_names:
            denoise.attach_controlnets(
                state, lambda hints: [local.controlnets.prepare(n, img) for n, img in hints], local.info
            )
        return local.vae.decode(denoise.run(state, local.unet_fn)), state
    finally:
        files = [f for _, f, *_ in state.controlnets]
        denoise.release_hints(state)
        assert not any(Path(f).exists() for f in files)


def test_split_forward_equals_unet_forward_with_residuals(local):
    unet = local.unet.model
    g = torch.Generator().manual_seed(0)
    s, t, e = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        state = encoder_half(unet, s, t, e)
        res = [torch.randn(shape, generator=g) for shape in state.residual_shapes()]
        split = decoder_half(unet, state, res[:-1], res[-1])
        ref = unet(
            s,
            t,
            encoder_hidden_states=e,
            down_block_additional_residuals=res[:-1],
            mid_block_additional_residual=res[-1],
        ).sample
        assert torch.equal(split, ref)
        assert torch.equal(decoder_half(unet, encoder_half(unet, s, t, e)), unet(s, t, encoder_hidden_states=e).sample)
        down, mid = unpack_residuals(pack_residuals(res[:-1], res[-1]), state.residual_shapes())
        assert all(torch.equal(a, b) for a, b in zip(down, res[:-1], strict=True)) and torch.equal(mid, res[-1])


@pytest.mark.parametrize("name", ["edges", "depth"])
def test_each_default_controlnet_changes_the_image(local, name):
    base, _ = generate(local, GenerationRequest(prompt="a photo of a cat", seed=1, steps=4))
    req = GenerationRequest(
        prompt="a photo of a cat", seed=1, steps=4, controlnet_names=(name,), controlnet_images=hint_images(1)
    )
    with_cn, _ = generate(local, req)
    assert pixel_diff(base, with_cn)[1] >= 2.0


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_one_controlnet_equals_diffusers(local, reference, model_dir, scheduler):
    req = GenerationRequest(
        prompt="a photo of a cat",
        negative_prompt="blurry",
        seed=3,
        steps=4,
        scheduler=scheduler,
        controlnet_names=("edges",),
        controlnet_images=hint_images(1),
        controlnet_scales=(0.8,),
    )
    ours, _ = generate(local, req)
    assert_same_image(ours, diffusers_controlnet_image(reference, model_dir, req))


def test_two_controlnets_with_scales_and_windows_equal_multicontrolnet(local, reference, model_dir):
    req = GenerationRequest(
        prompt="a red house",
        seed=5,
        steps=4,
        controlnet_names=("edges", "depth"),
        controlnet_images=hint_images(2),
        controlnet_scales=(1.2, 0.5),
        controlnet_guidance_start=(0.0, 0.25),
        controlnet_guidance_end=(0.75, 1.0),
    )
    ours, _ = generate(local, req)
    assert_same_image(ours, diffusers_controlnet_image(reference, model_dir, req))


def test_hint_embedding_is_computed_once_per_request(local):
    _, embedding = local.controlnets.model("edges")
    assert isinstance(local.controlnets.model("edges")[0].controlnet_cond_embedding, torch.nn.Identity)
    local.controlnets.hint_cache.clear()  # a cached hint is not embedded at all (tests/test_caches.py)
    calls = []
    handle = embedding.register_forward_hook(lambda *a: calls.append(1))
    try:
        generate(
            local, GenerationRequest(prompt="x", steps=5, controlnet_names=("edges",), controlnet_images=hint_images(1))
        )
    finally:
        handle.remove()
    assert len(calls) == 1  # not once per step (5) or per CFG branch (10)


def test_hints_are_released_when_the_request_fails(local):
    req = GenerationRequest(prompt="x", steps=3, controlnet_names=("edges",), controlnet_images=hint_images(1))
    state = denoise.prepare_encoded(req, local.text_encoder.encode_request(req), local.info)
    denoise.attach_controlnets(state, lambda hints: [local.controlnets.prepare(n, i) for n, i in hints], local.info)
    files = [f for _, f, *_ in state.controlnets]

    def broken(*args):
        raise RuntimeError("unet died")

    with pytest.raises(RuntimeError):
        try:
            denoise.run(state, broken)
        finally:
            denoise.release_hints(state)
    assert files and not any(Path(f).exists() for f in files)


def test_wrong_hint_size_is_invalid(local):
    req = GenerationRequest(prompt="x", steps=2, controlnet_names=("edges",), controlnet_images=hint_images(1, 32))
    state = denoise.prepare_encoded(req, local.text_encoder.encode_request(req), local.info)
    with pytest.raises(InvalidRequestError, match="CONTROLNET_IMAGES"):
        denoise.attach_controlnets(state, lambda hints: pytest.fail("must not prepare"), local.info)


def test_unknown_mismatched_and_corrupt_controlnets(local, model_dir, tmp_path):
    root = tmp_path / "controlnets"
    shutil.copytree(model_dir / "controlnets" / "edges", root / "edges")
    shutil.copytree(model_dir / "controlnets" / "edges", root / "wrong_arch")
    config = json.loads((root / "wrong_arch" / "config.json").read_text())
    config["cross_attention_dim"] = 768
    (root / "wrong_arch" / "config.json").write_text(json.dumps(config))
    shutil.copytree(model_dir / "controlnets" / "edges", root / "corrupt")
    (root / "corrupt" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    cfg = StageConfig.from_params("controlnet", {"model_dir": str(model_dir), "controlnet_dir": str(root)})
    service = ControlNetService(cfg, capacity=1)
    try:
        with pytest.raises(NotFoundError) as info:
            service.model("nope")
        assert "edges" in str(info.value) and info.value.field == "CONTROLNET_NAMES"
        with pytest.raises(InvalidRequestError, match="architecture"):
            service.model("wrong_arch")
        with pytest.raises(InvalidRequestError, match="cannot load"):
            service.model("corrupt")
        service.model("edges")
        assert service.stats.loads == 1
        shutil.copytree(model_dir / "controlnets" / "depth", root / "new_one")  # servable without a restart
        service.model("new_one")
        assert [name for name, _ in service._models.items()] == ["new_one"]  # capacity 1: LRU evicted "edges"
        service.model("new_one")
        assert service.stats.hits == 1
    finally:
        service.close()


def test_fp16_residuals_cross_and_the_unet_casts_them_back(local):
    """The GPU fp16 layout sends residuals in fp16 (half the bytes); the UNet side casts to its own dtype."""
    req = GenerationRequest(prompt="x", seed=2, steps=3, controlnet_names=("edges",), controlnet_images=hint_images(1))
    full, _ = generate(local, req)
    local.controlnets.residual_dtype = torch.float16
    try:
        half, _ = generate(local, req)
    finally:
        local.controlnets.residual_dtype = torch.float32
    assert pixel_diff(full, half)[1] < 1.0  # fp16 rounding of the residuals only
