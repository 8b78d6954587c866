"""Prompts as A1111 and ComfyUI users write them, in process: clip skip against diffusers' definition."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from triton_backend.errors import InvalidRequestError
from triton_backend.pipeline import LocalPipeline
from triton_backend.schema import GenerationRequest

from .helpers import assert_same_image, pipeline_image, pixel_diff


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


@pytest.fixture(scope="module")
def sd_pipe(model_dir):
    """A pipeline of its own: the shared reference's text encoder has had LoRAs fused and unfused (not bit-exact)."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_equals_diffusers_definition(local, sd_pipe, clip_skip):
    req = GenerationRequest(prompt="a portrait, anime", negative_prompt="ugly", seed=3, steps=4, clip_skip=clip_skip)
    pipe = sd_pipe
    with torch.inference_mode():
        embeds = clip_skip_embeds(pipe, req.prompt, clip_skip)
        negative = clip_skip_embeds(pipe, req.negative_prompt, clip_skip)
    ours = local.text_encoder.encode_request(req)["PROMPT_EMBEDS"]
    assert torch.equal(torch.from_numpy(ours), torch.cat([negative, embeds]))
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


def _embeds(local, **fields) -> torch.Tensor:
    return torch.from_numpy(local.text_encoder.encode_request(GenerationRequest(**fields))["PROMPT_EMBEDS"])


def test_a_plain_prompt_is_diffusers_encode_prompt_bit_for_bit(local, sd_pipe):
    ours = _embeds(local, prompt="a red house", negative_prompt="blurry")
    embeds, negative = sd_pipe.encode_prompt("a red house", "cpu", 1, True, "blurry")
    assert torch.equal(ours, torch.cat([negative, embeds]))


def test_a_weight_of_one_is_the_plain_prompt_and_other_weights_scale_their_tokens(local):
    plain = _embeds(local, prompt="a red house", guidance_scale=1.0)
    assert torch.equal(_embeds(local, prompt="a (red:1.0) house", guidance_scale=1.0), plain)
    weighted = _embeds(local, prompt="a (red:1.5) house", guidance_scale=1.0)
    tokenizer = local.text_encoder.tokenizers[0]
    red = tokenizer("a red house").input_ids.index(tokenizer.convert_tokens_to_ids("red</w>"))
    expected = plain.clone()
    expected[:, red] *= 1.5
    expected *= plain.mean() / expected.mean()  # A1111's "Original" emphasis: the chunk's mean is restored
    assert torch.allclose(weighted, expected, atol=1e-6)


def long_prompt(local, tokens: int = 110) -> str:
    """Words of this tokenizer's vocabulary, comma-separated, up to about ``tokens`` tokens (two chunks)."""
    tokenizer = local.text_encoder.tokenizers[0]
    words, text = ["a", "red", "house", "blue", "sky", "cat", "photo", "tree"], ""
    i = 0
    while len(tokenizer(text, add_special_tokens=False).input_ids) < tokens:
        text += ("" if not text else ", " if i % 3 == 0 else " ") + words[i % len(words)]
        i += 1
    return text


def test_long_prompts_are_encoded_in_75_token_chunks_and_their_ends_matter(local):
    LONG = long_prompt(local)
    ours = _embeds(local, prompt=LONG, negative_prompt="blurry")
    assert ours.shape[1] == 154  # two chunks; the negative prompt padded to two with the empty prompt's chunk
    empty = local.text_encoder.encode_request(GenerationRequest(prompt="x", negative_prompt=""))["PROMPT_EMBEDS"][0]
    assert torch.equal(ours[0, 77:], torch.from_numpy(empty))
    a = GenerationRequest(prompt=LONG + ", a red house", seed=1, steps=4)
    b = GenerationRequest(prompt=LONG + ", a blue boat", seed=1, steps=4)
    assert pixel_diff(local.generate(a).image, local.generate(b).image)[1] > 0.1  # (diffusers would cut both)


def test_break_starts_a_new_chunk(local):
    assert _embeds(local, prompt="a red house BREAK a blue sky", guidance_scale=1.0).shape[1] == 154
    first = _embeds(local, prompt="a red house BREAK a blue sky", guidance_scale=1.0)[:, :77]
    assert torch.equal(first, _embeds(local, prompt="a red house", guidance_scale=1.0))


def write_embedding(path, vectors: torch.Tensor, kind: str) -> None:
    if kind == "a1111_pt":
        torch.save({"string_to_param": {"*": vectors}, "name": path.stem, "step": 100}, path)
    elif kind == "a1111_safetensors":
        from safetensors.torch import save_file

        save_file({"emb_params": vectors.contiguous()}, str(path))
    else:  # diffusers: {token: [D]} (one vector)
        torch.save({f"<{path.stem}>": vectors[0]}, path)


@pytest.mark.parametrize(
    ("kind", "suffix", "count"),
    [("a1111_pt", ".pt", 2), ("a1111_safetensors", ".safetensors", 3), ("diffusers", ".bin", 1)],
)
def test_an_embedding_equals_diffusers_load_textual_inversion(model_dir, tmp_path, kind, suffix, count):
    import shutil

    work = tmp_path / "model"
    shutil.copytree(model_dir, work, symlinks=True)
    pipe = LocalPipeline(work)
    try:
        req = GenerationRequest(prompt="a photo of shinycat in a garden", negative_prompt="blurry", seed=2, steps=4)
        before = pipe.generate(req).image  # (no file yet: the word is plain text)
        dim = pipe.text_encoder.models[0].get_input_embeddings().weight.shape[1]
        vectors = torch.randn(count, dim, generator=torch.Generator().manual_seed(3))
        (work / "embeddings").mkdir()
        write_embedding(work / "embeddings" / f"shinycat{suffix}", vectors, kind)
        ours = pipe.generate(req).image  # added while "serving": the next request uses it
        assert pixel_diff(ours, before)[1] > 0.5

        import diffusers

        ref = diffusers.StableDiffusionPipeline.from_pretrained(str(work), safety_checker=None)
        ref.set_progress_bar_config(disable=True)
        ref.load_textual_inversion(str(work / "embeddings" / f"shinycat{suffix}"), token="shinycat")
        expected = ref(
            req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=req.steps,
            generator=torch.Generator("cpu").manual_seed(req.seed), output_type="np",
        ).images[0]  # fmt: skip
        assert_same_image(ours, (expected * 255).round().astype("uint8"))

        write_embedding(work / "embeddings" / f"shinycat{suffix}", vectors * 2, kind)  # changed: never stale
        assert pixel_diff(pipe.generate(req).image, ours)[1] > 0.1
        (work / "embeddings" / f"shinycat{suffix}").unlink()
        assert_same_image(pipe.generate(req).image, before)
    finally:
        pipe.close()


def test_an_embedding_for_another_model_is_refused_naming_the_prompt(model_dir, tmp_path):
    import shutil

    work = tmp_path / "model"
    shutil.copytree(model_dir, work, symlinks=True)
    (work / "embeddings").mkdir()
    torch.save({"string_to_param": {"*": torch.zeros(2, 7)}}, work / "embeddings" / "oddsize.pt")
    pipe = LocalPipeline(work)
    try:
        with pytest.raises(InvalidRequestError) as info:
            pipe.text_encoder.encode_request(GenerationRequest(prompt="x", negative_prompt="oddsize"))
        assert info.value.field == "NEGATIVE_PROMPT" and "oddsize.pt" in str(info.value)
        pipe.text_encoder.encode_request(GenerationRequest(prompt="x"))  # (unused: no error)
    finally:
        pipe.close()


@pytest.mark.parametrize(
    ("fields", "field", "needle"),
    [
        ({"prompt": "a (red:1000) house"}, "PROMPT", "weight 1000"),
        ({"prompt": "x", "negative_prompt": "(ugly:-500)"}, "NEGATIVE_PROMPT", "weight -500"),
        ({"prompt": " BREAK ".join(["a red house"] * 17)}, "PROMPT", "17 chunks"),
        ({"prompt": "x", "clip_skip": 0}, "CLIP_SKIP", "out of range"),
    ],
)
def test_absurd_prompts_are_refused_naming_the_field(local, fields, field, needle):
    from triton_backend.schema import parse_request

    with pytest.raises(InvalidRequestError) as info:
        local.text_encoder.encode_request(parse_request(GenerationRequest(**fields).to_tensors()))
    assert info.value.field == field and needle in str(info.value)


def test_an_sdxl_embedding_pair_equals_diffusers_loading_it_into_both_encoders(sdxl_model_dir, tmp_path):
    import shutil

    import diffusers
    from safetensors.torch import save_file

    work = tmp_path / "model"
    shutil.copytree(sdxl_model_dir, work, symlinks=True)
    pipe = LocalPipeline(work)
    try:
        widths = [m.get_input_embeddings().weight.shape[1] for m in pipe.text_encoder.models]
        g = torch.Generator().manual_seed(4)
        clip_l, clip_g = (torch.randn(2, w, generator=g) for w in widths)
        (work / "embeddings").mkdir()
        save_file({"clip_l": clip_l, "clip_g": clip_g}, str(work / "embeddings" / "xlstyle.safetensors"))
        req = GenerationRequest(prompt="a photo of xlstyle, (sharp:1.2)", negative_prompt="blurry", seed=2, steps=4)
        ours = pipe.generate(req).image
        ref = diffusers.StableDiffusionXLPipeline.from_pretrained(str(work), add_watermarker=False)
        ref.set_progress_bar_config(disable=True)
        ref.load_textual_inversion(clip_l, token="xlstyle", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
        ref.load_textual_inversion(clip_g, token="xlstyle", text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
        plain = GenerationRequest(prompt="a photo of xlstyle, sharp", negative_prompt="blurry", seed=2, steps=4)
        expected = pipeline_image(ref, plain)
        # (diffusers has no weights: compare the weight-free prompt, and check the weight changes the image)
        assert_same_image(pipe.generate(plain).image, expected)
        assert pixel_diff(ours, expected)[1] > 0.05
    finally:
        pipe.close()
