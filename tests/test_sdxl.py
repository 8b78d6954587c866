"""SDXL in-process: every stage against diffusers' SDXL pipelines, and architecture mismatches (no server)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from triton_backend.config import StageConfig
from triton_backend.controlnet.service import ControlNetService
from triton_backend.controlnet.unet_split import decoder_half, encoder_half
from triton_backend.errors import InvalidRequestError
from triton_backend.pipeline import LocalPipeline
from triton_backend.schema import GenerationRequest
from triton_backend.stages import denoise
from triton_backend.stages.unet import StepInput

from .helpers import assert_same_image, hint_images, lora_request, pixel_diff

MICRO = dict(original_size=(32, 40), crops_coords_top_left=(4, 8), target_size=(48, 48))


@pytest.fixture(scope="module")
def xl(sdxl_model_dir):
    pipe = LocalPipeline(sdxl_model_dir)
    yield pipe
    pipe.close()


@pytest.mark.parametrize("negative", [None, "blurry"])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_text_encoder_equals_diffusers_encode_prompt(xl, sdxl_reference, negative, guidance):
    """Concatenated penultimate hidden states of both encoders, the second one's pooled projection, and zero
    negative embeddings when no negative prompt is given (``force_zeros_for_empty_prompt``).
    """
    req = GenerationRequest(prompt="a photo of a cat", negative_prompt=negative, guidance_scale=guidance)
    ours = xl.text_encoder.encode_request(req)
    embeds, neg, pooled, neg_pooled = sdxl_reference.pipe.encode_prompt(
        req.prompt, device="cpu", do_classifier_free_guidance=guidance > 1, negative_prompt=negative
    )
    if guidance > 1:
        embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
    assert torch.equal(torch.from_numpy(ours["PROMPT_EMBEDS"]), embeds)
    assert torch.equal(torch.from_numpy(ours["POOLED_EMBEDS"]), pooled)
    assert ours["PROMPT_EMBEDS"].shape[2] == 80 and ours["POOLED_EMBEDS"].shape[1] == 24
    if guidance > 1 and negative is None:
        assert not ours["PROMPT_EMBEDS"][0].any() and not ours["POOLED_EMBEDS"][0].any()


@pytest.mark.parametrize(
    "fields",
    [
        dict(prompt_2="an oil painting"),
        dict(negative_prompt="blurry", negative_prompt_2="ugly dark", prompt_2="a sketch"),
        dict(negative_prompt_2="ugly"),  # ignored, as diffusers: no negative prompt → zero embeddings
    ],
)
def test_second_encoder_prompts_equal_diffusers(xl, sdxl_reference, fields):
    req = GenerationRequest(prompt="a photo of a cat", seed=6, steps=3, **fields)
    ours = xl.text_encoder.encode_request(req)
    embeds, neg, pooled, neg_pooled = sdxl_reference.pipe.encode_prompt(
        req.prompt,
        prompt_2=req.prompt_2,
        device="cpu",
        do_classifier_free_guidance=True,
        negative_prompt=req.negative_prompt,
        negative_prompt_2=req.negative_prompt_2,
    )
    assert torch.equal(torch.from_numpy(ours["PROMPT_EMBEDS"]), torch.cat([neg, embeds]))
    assert torch.equal(torch.from_numpy(ours["POOLED_EMBEDS"]), torch.cat([neg_pooled, pooled]))
    plain = xl.text_encoder.encode_request(GenerationRequest(prompt=req.prompt, negative_prompt=req.negative_prompt))
    changed = not np.array_equal(ours["PROMPT_EMBEDS"], plain["PROMPT_EMBEDS"])
    assert changed == ("prompt_2" in fields)
    assert_same_image(xl.generate(req).image, sdxl_reference(req))


def test_second_encoder_prompts_are_refused_by_sd_models(model_dir):
    sd = LocalPipeline(model_dir)
    try:
        for field in ("prompt_2", "negative_prompt_2"):
            with pytest.raises(InvalidRequestError, match=r"SDXL models; this model is SD1.x/2.x") as info:
                sd.text_encoder.encode_request(GenerationRequest(prompt="x", **{field: "y"}))
            assert info.value.field == field.upper()
    finally:
        sd.close()


@pytest.mark.parametrize("scheduler", ["default", "euler_a", "ddim", "dpmpp_2m", "unipc"])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_equals_stable_diffusion_xl_pipeline(xl, sdxl_reference, scheduler, guidance):
    req = GenerationRequest(prompt="a red house", negative_prompt="blurry", seed=5, steps=4, guidance_scale=guidance)
    req = GenerationRequest(**{**req.__dict__, "scheduler": scheduler})
    ours, ref = xl.generate(req).image, sdxl_reference(req)
    assert np.array_equal(ours, ref) or assert_same_image(ours, ref) is None


def test_micro_conditioning_equals_diffusers_and_changes_the_image(xl, sdxl_reference):
    plain = GenerationRequest(prompt="a dog on the beach", seed=2, steps=4)
    micro = GenerationRequest(prompt="a dog on the beach", seed=2, steps=4, **MICRO)
    ours = xl.generate(micro).image
    assert_same_image(ours, sdxl_reference(micro))
    assert pixel_diff(ours, xl.generate(plain).image)[0] >= 2  # the time ids reach the UNet


def test_non_square_size_equals_diffusers(xl, sdxl_reference):
    req = GenerationRequest(prompt="a castle", seed=1, steps=3, height=48, width=96, scheduler="ddim")
    ours = xl.generate(req).image
    assert ours.shape == (48, 96, 3)
    assert_same_image(ours, sdxl_reference(req))


def test_latent_parallel_rows_carry_the_added_conditioning(xl, sdxl_reference):
    rows = []

    def unet_many(calls):
        rows.append([c[5]["time_ids"].shape[0] for c in calls])
        return [xl.unet_fn(*c) for c in calls]

    req = GenerationRequest(prompt="a red car", negative_prompt="ugly", seed=8, steps=3, **MICRO)
    state = denoise.prepare_encoded(req, xl.text_encoder.encode_request(req), xl.info)
    parallel = xl.vae.decode(denoise.run(state, denoise.latent_parallel(unet_many)))
    assert rows == [[1, 1]] * 3
    assert_same_image(parallel, xl.generate(req).image)
    assert_same_image(parallel, sdxl_reference(req))


def test_unet_split_equals_forward_with_added_conditioning(xl):
    unet = xl.unet.model
    g = torch.Generator().manual_seed(0)
    s, t, e = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 80, generator=g)
    added = {"text_embeds": torch.randn(2, 24, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        state = encoder_half(unet, s, t, e, added)
        res = [torch.randn(shape, generator=g) for shape in state.residual_shapes()]
        ref = unet(
            s,
            t,
            encoder_hidden_states=e,
            added_cond_kwargs=added,
            down_block_additional_residuals=res[:-1],
            mid_block_additional_residual=res[-1],
        ).sample
        assert torch.equal(decoder_half(unet, state, res[:-1], res[-1]), ref)


@pytest.mark.parametrize(
    "loras",
    [
        (("pastel_peft", 1.0),),  # PEFT keys for unet, text_encoder and text_encoder_2
        (("ink_kohya", 1.0),),  # kohya lora_unet_
        (("glow_kohya", 1.0),),  # kohya lora_unet_ + lora_te1_ + lora_te2_
        (("ink_kohya", 0.7), ("glow_kohya", -0.5)),
    ],
)
def test_loras_at_k0_equal_diffusers_fuse_lora(xl, sdxl_reference, loras):
    req = lora_request(loras)
    result = xl.generate(req)
    assert result.landed_step == 0
    base = xl.generate(GenerationRequest(prompt=req.prompt, seed=3, steps=4)).image
    assert pixel_diff(result.image, base)[0] >= 2  # the LoRA changes the image
    assert_same_image(result.image, sdxl_reference(req))


def test_sdxl_lora_factors_cover_both_text_encoders(xl):
    for name in ("pastel_peft", "glow_kohya"):
        keys = list(xl.loras.convert(xl.loras.root / f"{name}.safetensors"))
        components = {k.split(":")[0] for k in keys}
        assert components == {"unet", "text_encoder", "text_encoder_2"}, name


def test_controlnets_equal_stable_diffusion_xl_controlnet_pipeline(xl, sdxl_reference):
    one = GenerationRequest(
        prompt="a house", seed=4, steps=4, controlnet_names=("edges",), controlnet_images=hint_images(1)
    )
    two = GenerationRequest(
        prompt="a house",
        seed=4,
        steps=4,
        controlnet_names=("edges", "depth"),
        controlnet_images=hint_images(2),
        controlnet_scales=(0.8, 1.3),
        controlnet_guidance_start=(0.0, 0.25),
        controlnet_guidance_end=(0.75, 1.0),
        **MICRO,
    )
    plain = xl.generate(GenerationRequest(prompt="a house", seed=4, steps=4)).image
    for req in (one, two):
        ours = xl.generate(req).image
        assert pixel_diff(ours, plain)[0] >= 2
        assert_same_image(ours, sdxl_reference(req))


def test_sd_lora_on_sdxl_and_sdxl_lora_on_sd_are_refused_naming_both(model_dir, sdxl_model_dir, tmp_path):
    sd = LocalPipeline(model_dir)
    xl = LocalPipeline(sdxl_model_dir)
    try:
        for name in ("pastel_peft", "ink_kohya", "glow_kohya"):
            shutil.copy(model_dir / "loras" / f"{name}.safetensors", tmp_path / f"sd_{name}.safetensors")
            with pytest.raises(InvalidRequestError, match=f"sd_{name}.*SDXL") as info:
                xl.loras.convert(tmp_path / f"sd_{name}.safetensors")
            assert info.value.field == "LORA_NAMES"
        for name in ("pastel_peft", "glow_kohya"):  # have text_encoder_2 layers, which SD models lack
            shutil.copy(sdxl_model_dir / "loras" / f"{name}.safetensors", tmp_path / f"xl_{name}.safetensors")
            with pytest.raises(InvalidRequestError, match=f"xl_{name}.*SDXL LoRA.*SD1.x/2.x"):
                sd.loras.convert(tmp_path / f"xl_{name}.safetensors")
        shutil.copy(sdxl_model_dir / "loras" / "ink_kohya.safetensors", tmp_path / "xl_ink.safetensors")
        with pytest.raises(InvalidRequestError, match=r"xl_ink.*another architecture"):
            sd.loras.convert(tmp_path / "xl_ink.safetensors")
    finally:
        sd.close()
        xl.close()


@pytest.mark.parametrize("direction", ["sd_on_sdxl", "sdxl_on_sd"])
def test_controlnet_of_the_other_architecture_is_refused(model_dir, sdxl_model_dir, tmp_path, direction):
    base, other = (sdxl_model_dir, model_dir) if direction == "sd_on_sdxl" else (model_dir, sdxl_model_dir)
    shutil.copytree(other / "controlnets" / "edges", tmp_path / "foreign")
    cfg = StageConfig.from_params("controlnet", {"model_dir": str(base), "controlnet_dir": str(tmp_path)})
    service = ControlNetService(cfg)
    try:
        with pytest.raises(InvalidRequestError, match=r"foreign: an SD.*ControlNet.*this model is") as info:
            service.model("foreign")
        assert info.value.field == "CONTROLNET_NAMES"
    finally:
        service.close()


def test_sdxl_only_inputs_are_checked_per_architecture(model_dir, sdxl_model_dir):
    from triton_backend.model_info import ModelInfo

    sd, xl = ModelInfo.read(model_dir), ModelInfo.read(sdxl_model_dir)
    req = GenerationRequest(prompt="x", original_size=(64, 64))
    with pytest.raises(InvalidRequestError, match=r"ORIGINAL_SIZE.*SD1.x/2.x"):
        denoise.prepare(req, torch.zeros(2, 77, sd.cross_attention_dim), sd)
    with pytest.raises(InvalidRequestError, match="POOLED_EMBEDS"):
        denoise.prepare(GenerationRequest(prompt="x"), torch.zeros(2, 77, 80), xl)
    s, t = torch.zeros(1, 4, 8, 8), torch.zeros(1)
    with pytest.raises(InvalidRequestError, match="TEXT_EMBEDS"):
        StepInput(s, t, torch.zeros(1, 77, 80)).validate(xl)
    with pytest.raises(InvalidRequestError, match="TIME_IDS"):
        StepInput(s, t, torch.zeros(1, 77, 80), text_embeds=torch.zeros(1, 24), time_ids=torch.zeros(1, 5)).validate(xl)
    with pytest.raises(InvalidRequestError, match=r"TEXT_EMBEDS.*SD1.x/2.x"):
        StepInput(s, t, torch.zeros(1, 77, 32), text_embeds=torch.zeros(1, 24)).validate(sd)


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("ORIGINAL_SIZE", (64,), "expected 2 values"),
        ("TARGET_SIZE", (0, 64), "each value"),
        ("CROPS_COORDS_TOP_LEFT", (-1, 0), "each value"),
    ],
)
def test_bad_micro_conditioning_is_invalid(field, value, needle):
    from triton_backend.schema import parse_request

    tensors = GenerationRequest(prompt="x").to_tensors()
    tensors[field] = np.array(value, dtype=np.int32)
    with pytest.raises(InvalidRequestError, match=needle) as info:
        parse_request(tensors)
    assert info.value.field == field


def test_sdxl_vae_decodes_in_float32_when_the_stages_run_in_float16(model_dir, sdxl_model_dir):
    from triton_backend.model_info import ModelInfo
    from triton_backend.stages.vae import Vae

    sd, xl = ModelInfo.read(model_dir), ModelInfo.read(sdxl_model_dir)
    assert Vae.decode_dtype(xl, torch.float16) == torch.float32  # diffusers' force_upcast
    assert Vae.decode_dtype(xl, torch.bfloat16) == torch.bfloat16
    assert Vae.decode_dtype(sd, torch.float16) == torch.float16  # the SD pipeline never upcasts


def test_sgm_style_kohya_lora_equals_diffusers(xl, sdxl_reference, sdxl_model_dir):
    """kohya files of SDXL often name UNet blocks the SGM way (``lora_unet_input_blocks_4_1_…``); diffusers' SDXL
    loader remaps them with the UNet config, and so must the conversion.
    """
    from safetensors.torch import load_file, save_file

    per_block = xl.unet.model.config.layers_per_block + 1
    tensors = {}
    for key, value in load_file(str(sdxl_model_dir / "loras" / "ink_kohya.safetensors")).items():
        parts = key.split("_")  # lora_unet_down_blocks_{i}_attentions_{j}_…
        if parts[2:4] == ["down", "blocks"] and parts[5] == "attentions":
            block = 1 + int(parts[4]) * per_block + int(parts[6])
            tensors["_".join(["lora", "unet", "input", "blocks", str(block), "1", *parts[7:]])] = value
    assert tensors and all("input_blocks_" in k for k in tensors)
    path = sdxl_model_dir / "loras" / "sgm_ink.safetensors"
    save_file(tensors, str(path))
    try:
        req = GenerationRequest(prompt="a red car", seed=2, steps=3, lora_names=("sgm_ink",), lora_bound_k=0)
        ours = xl.generate(req).image
        assert pixel_diff(ours, xl.generate(GenerationRequest(prompt="a red car", seed=2, steps=3)).image)[0] >= 2
        assert_same_image(ours, sdxl_reference(req))
    finally:
        path.unlink()
