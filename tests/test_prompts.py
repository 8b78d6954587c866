"""Prompts as A1111 and ComfyUI users write them, in process: clip skip against diffusers' definition."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from triton_backend.errors import InvalidRequestError
from triton_backend.pipeline import LocalPipeline
from triton_backend.schema import GenerationRequest

from .helpers import assert_same_image, pixel_diff


@pytest.fixture(scope="module")
def xl(sdxl_model_dir):
    pipe = LocalPipeline(sdxl_model_dir)
    yield pipe
    pipe.close()


def clip_skip_embeds(pipe, text: str, clip_skip: int) -> torch.Tensor:
    """diffusers' definition (``encode_prompt`` with ``clip_skip = CLIP_SKIP - 1``), written out: diffusers 0.42's
    own path reads ``text_encoder.text_model``, which transformers 5's ``CLIPTextModel`` no longer has.
    """
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    return pipe.text_encoder.final_layer_norm(hidden)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_equals_diffusers_definition(local, reference, clip_skip):
    req = GenerationRequest(prompt="a portrait, anime", negative_prompt="ugly", seed=3, steps=4, clip_skip=clip_skip)
    pipe = reference.pipe
    with torch.inference_mode():
        embeds = clip_skip_embeds(pipe, req.prompt, clip_skip)
        negative = clip_skip_embeds(pipe, req.negative_prompt, clip_skip)
    ours = local.text_encoder.encode_request(req)["PROMPT_EMBEDS"]
    assert torch.equal(torch.from_numpy(ours), torch.cat([negative, embeds]))
    reference.pipe.scheduler = reference.base_scheduler
    expected = pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        num_inference_steps=req.steps,
        generator=torch.Generator("cpu").manual_seed(req.seed),
        output_type="np",
    ).images[0]
    assert_same_image(local.generate(req).image, (expected * 255).round().astype("uint8"))
    if clip_skip == 2:
        assert pixel_diff(local.generate(req).image, local.generate(dataclasses.replace(req, clip_skip=1)).image)[1] > 1


def test_clip_skip_on_sdxl_takes_one_layer_deeper_in_both_encoders(xl):
    req = GenerationRequest(prompt="a portrait, anime", seed=3, steps=4, clip_skip=2)
    ours = xl.text_encoder.encode_request(req)
    with torch.inference_mode():
        parts = []
        for tokenizer, encoder in zip(xl.text_encoder.tokenizers, xl.text_encoder.models, strict=True):
            ids = tokenizer(req.prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            parts.append(encoder(ids.input_ids, output_hidden_states=True).hidden_states[-3])  # diffusers: -(1 + 2)
    assert torch.equal(torch.from_numpy(ours["PROMPT_EMBEDS"][1:]), torch.cat(parts, dim=-1))
    plain = xl.text_encoder.encode_request(dataclasses.replace(req, clip_skip=1))
    assert torch.equal(torch.from_numpy(ours["POOLED_EMBEDS"]), torch.from_numpy(plain["POOLED_EMBEDS"]))


def test_clip_skip_beyond_the_encoder_is_refused_naming_it(local):
    layers = local.text_encoder.models[0].config.num_hidden_layers
    with pytest.raises(InvalidRequestError) as info:
        local.text_encoder.encode_request(GenerationRequest(prompt="x", clip_skip=layers + 1))
    assert info.value.field == "CLIP_SKIP"


def test_the_prompt_cache_keys_on_clip_skip(local):
    req = GenerationRequest(prompt="a cached prompt", steps=2)
    a = local.text_encoder.encode_request(req)["PROMPT_EMBEDS"]
    b = local.text_encoder.encode_request(dataclasses.replace(req, clip_skip=2))["PROMPT_EMBEDS"]
    assert (a != b).any()
