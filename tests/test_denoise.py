"""The package's stages, run in-process, equal diffusers' StableDiffusionPipeline (no server)."""

import numpy as np
import pytest
import torch

from triton_backend.errors import CancelledError, InvalidRequestError
from triton_backend.schema import GenerationRequest
from triton_backend.stages import denoise
from triton_backend.stages.unet import StepInput

from .helpers import assert_same_image, unet_forward


@pytest.fixture(scope="module")
def stages(local):
    return (local.text_encoder, (lambda *call: unet_forward(local.unet, StepInput.of(*call))), local.vae, local.info)


def generate(stages, request):
    te, unet, vae, info = stages
    state = denoise.prepare_encoded(request, te.encode_request(request), info)
    return vae.decode(denoise.run(state, unet))


@pytest.mark.parametrize("scheduler", ["default", "euler", "euler_a", "ddim", "dpmpp_2m", "pndm", "unipc"])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_equals_diffusers(stages, reference, scheduler, guidance):
    req = GenerationRequest(
        prompt="a photo of a cat",
        negative_prompt="blurry",
        seed=5,
        steps=4,
        guidance_scale=guidance,
        scheduler=scheduler,
    )
    ours, ref = generate(stages, req), reference(req)
    assert np.array_equal(ours, ref) or assert_same_image(ours, ref) is None


def test_non_square_equals_diffusers_and_an_over_long_prompt_is_chunked_not_cut(stages, reference):
    req = GenerationRequest(prompt="a cat on a wall", seed=1, steps=3, height=48, width=96, scheduler="ddim")
    ours = generate(stages, req)
    assert ours.shape == (48, 96, 3)
    assert_same_image(ours, reference(req))
    te = stages[0]
    long = GenerationRequest(prompt=" ".join(["cat"] * 200), guidance_scale=1.0)
    embeds = torch.from_numpy(te.encode_request(long)["PROMPT_EMBEDS"])
    tokens = len(te.tokenizers[0](long.prompt, add_special_tokens=False).input_ids)
    assert embeds.shape[1] == 77 * -(-tokens // 75)  # 75-token chunks, each between its own bos and eos (A1111)
    truncated = reference.pipe.encode_prompt(long.prompt, "cpu", 1, False)[0]  # diffusers cuts at 75 tokens
    # (to rounding: other tests fused and unfused LoRAs into the shared reference's text encoder)
    torch.testing.assert_close(embeds[:, :77], truncated, atol=1e-5, rtol=0)


def test_guidance_at_most_one_skips_the_unconditional_branch(stages):
    te, _, _, info = stages
    calls = []

    def unet(s, t, e, a, c=(), x=None):
        calls.append(s.shape[0])
        return torch.zeros_like(s)

    for g, rows in ((1.0, 1), (0.5, 1), (1.01, 2)):
        calls.clear()
        req = GenerationRequest(prompt="x", steps=2, guidance_scale=g)
        denoise.run(denoise.prepare_encoded(req, te.encode_request(req), info), unet)
        assert calls == [rows, rows]


def test_state_is_per_request(stages):
    """Interleaving two requests step by step gives each its own result (no shared scheduler/generator)."""
    te, unet, vae, info = stages
    a = GenerationRequest(prompt="a cat", seed=1, steps=4, scheduler="euler_a")
    b = GenerationRequest(prompt="a dog", seed=2, steps=4, scheduler="euler_a")
    sa = denoise.prepare_encoded(a, te.encode_request(a), info)
    sb = denoise.prepare_encoded(b, te.encode_request(b), info)
    while not (sa.done and sb.done):
        for s in (sa, sb):
            if not s.done:
                denoise.apply_step(s, unet(*denoise.model_input(s)))
    assert np.array_equal(vae.decode(sa.latents.numpy()), generate(stages, a))
    assert np.array_equal(vae.decode(sb.latents.numpy()), generate(stages, b))


def test_cancellation_stops_the_loop(stages):
    te, unet, _, info = stages
    req = GenerationRequest(prompt="x", steps=5)
    state = denoise.prepare_encoded(req, te.encode_request(req), info)
    with pytest.raises(CancelledError):
        denoise.run(state, unet, on_step=None, is_cancelled=lambda: state.step_index >= 2)
    assert state.step_index == 2


def test_embeds_shape_must_match_guidance(stages):
    _, _, _, info = stages
    req = GenerationRequest(prompt="x", guidance_scale=7.5)
    with pytest.raises(InvalidRequestError, match="PROMPT_EMBEDS"):
        denoise.prepare(req, torch.zeros(1, 77, info.cross_attention_dim), info)


def test_too_few_steps_for_the_scheduler_name_steps(stages):
    """PNDM's Runge-Kutta warm-up needs 4 steps; diffusers raises a bare ValueError (found by the soak)."""
    _, _, _, info = stages
    req = GenerationRequest(prompt="x", steps=3, scheduler="pndm")
    with pytest.raises(InvalidRequestError, match=r"STEPS.*too few for the PNDMScheduler"):
        denoise.prepare(req, torch.zeros(2, 77, info.cross_attention_dim), info)
    assert denoise.prepare(
        GenerationRequest(prompt="x", steps=4, scheduler="pndm"), torch.zeros(2, 77, info.cross_attention_dim), info
    )


def test_size_must_be_a_multiple_of_the_vae_factor(stages):
    _, _, _, info = stages
    with pytest.raises(InvalidRequestError, match="WIDTH"):
        denoise.resolve_size(GenerationRequest(prompt="x", width=60), info)


@pytest.mark.parametrize("scheduler", ["euler_a", "ddim"])
def test_latent_parallel_equals_batch2_cfg_and_diffusers(stages, reference, scheduler):
    te, unet, vae, info = stages
    rows_per_call = []

    def unet_many(calls):
        rows_per_call.append([c[0].shape[0] for c in calls])
        return [unet(*c) for c in calls]

    req = GenerationRequest(prompt="a photo of a cat", negative_prompt="ugly", seed=8, steps=4, scheduler=scheduler)
    embeds = te.encode_request(req)
    parallel = vae.decode(denoise.run(denoise.prepare_encoded(req, embeds, info), denoise.latent_parallel(unet_many)))
    batch2 = vae.decode(denoise.run(denoise.prepare_encoded(req, embeds, info), unet))
    assert rows_per_call == [[1, 1]] * 4  # two concurrent batch-1 calls per step
    assert_same_image(parallel, batch2)
    assert_same_image(parallel, reference(req))


def test_latent_parallel_passes_through_without_guidance(stages):
    te, unet, _, info = stages
    calls = []
    lp = denoise.latent_parallel(lambda c: calls.append(len(c)) or [unet(*x) for x in c])
    req = GenerationRequest(prompt="x", steps=2, guidance_scale=1.0)
    denoise.run(denoise.prepare_encoded(req, te.encode_request(req), info), lp)
    assert calls == [1, 1]


def test_vae_channels_last_decodes_the_same_image(model_dir, local):
    """``channels_last`` (on by default on a CPU; ``local`` has it on) vs the decoder as diffusers loads it."""
    from triton_backend.config import StageConfig
    from triton_backend.errors import ConfigError
    from triton_backend.stages.vae import Vae

    plain = Vae(StageConfig.from_params("vae", {"model_dir": str(model_dir), "channels_last": "off"}))
    assert local.vae.model.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.model.decoder.conv_in.weight.is_contiguous()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).numpy()
    assert_same_image(local.vae.decode(latents), plain.decode(latents))
    with pytest.raises(ConfigError, match="channels_last"):
        Vae(StageConfig.from_params("vae", {"model_dir": str(model_dir), "channels_last": "yes"}))
