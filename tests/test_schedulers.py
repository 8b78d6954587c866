"""The sampler table: every name builds the diffusers scheduler it names, and the in-process stages equal diffusers
with that scheduler built here by hand (not through the table)."""

import diffusers
import numpy as np
import pytest

from triton_backend.errors import InvalidRequestError
from triton_backend.schedulers import SCHEDULER_NAMES, canonical_scheduler, is_available, make_scheduler
from triton_backend.schema import GenerationRequest
from triton_backend.stages import denoise
from triton_backend.stages.unet import StepInput

from .helpers import assert_same_image, optional_sampler, unet_forward

KARRAS = {"use_karras_sigmas": True}
TRAILING = {"timestep_spacing": "trailing"}
#: What each name must be, written out independently of the table: diffusers class and config overrides.
EXPECTED = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", KARRAS),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "heun_karras": ("HeunDiscreteScheduler", KARRAS),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_karras": ("KDPM2DiscreteScheduler", KARRAS),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", KARRAS),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", KARRAS),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", KARRAS),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", **KARRAS}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", KARRAS),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {}),
    "dpmpp_2s_karras": ("DPMSolverSinglestepScheduler", KARRAS),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc_karras": ("UniPCMultistepScheduler", KARRAS),
    "deis": ("DEISMultistepScheduler", {}),
    "deis_karras": ("DEISMultistepScheduler", KARRAS),
    "euler_trailing": ("EulerDiscreteScheduler", TRAILING),
    "euler_a_trailing": ("EulerAncestralDiscreteScheduler", TRAILING),
    "dpmpp_2m_trailing": ("DPMSolverMultistepScheduler", TRAILING),
    "dpmpp_sde_trailing": ("DPMSolverSDEScheduler", TRAILING),
    "ddim_trailing": ("DDIMScheduler", TRAILING),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}

#: A1111 sampler names and ComfyUI sampler (+ scheduler) names as users type them.
ALIASES = {
    "Euler": "euler",
    "Euler a": "euler_a",
    "euler_ancestral": "euler_a",
    "Heun": "heun",
    "DPM2": "dpm2",
    "DPM2 a": "dpm2_a",
    "DPM2 a Karras": "dpm2_a_karras",
    "dpm_2_ancestral": "dpm2_a",
    "LMS": "lms",
    "LMS Karras": "lms_karras",
    "DDIM": "ddim",
    "PLMS": "pndm",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M Karras": "dpmpp_2m_karras",
    "dpmpp_2m karras": "dpmpp_2m_karras",
    "dpmpp_2m normal": "dpmpp_2m",
    "DPM++ SDE": "dpmpp_sde",
    "DPM++ SDE Karras": "dpmpp_sde_karras",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Karras": "dpmpp_2m_sde_karras",
    "UniPC": "unipc",
    "uni_pc": "unipc",
    "uni_pc karras": "unipc_karras",
    "deis": "deis",
    "LCM": "lcm",
    "TCD": "tcd",
    "Euler a SGM Uniform": "euler_a_trailing",
    "euler sgm_uniform": "euler_trailing",
    "dpmpp_2m sgm_uniform": "dpmpp_2m_trailing",
}


def test_table_is_written_out_here():
    assert set(SCHEDULER_NAMES) == {"default", *EXPECTED}


@pytest.mark.parametrize(("alias", "name"), ALIASES.items())
def test_aliases(alias, name):
    assert canonical_scheduler(alias) == name


def test_each_name_builds_its_class_and_default_is_the_model_scheduler(model_dir):
    from triton_backend.model_info import ModelInfo

    config = ModelInfo.read(model_dir).scheduler_config
    assert type(make_scheduler("default", config)).__name__ == config["_class_name"]
    for name, (cls, overrides) in EXPECTED.items():
        if not is_available(name):  # tested below: refused with the install command
            continue
        sched = make_scheduler(name, config)
        assert type(sched).__name__ == cls, name
        assert sched.config.beta_schedule == config["beta_schedule"]
        for key, value in overrides.items():
            assert sched.config[key] == value, (name, key)
        if "use_karras_sigmas" in sched.config and not overrides.get("use_karras_sigmas"):
            assert not sched.config.use_karras_sigmas, name


def test_a_sampler_whose_package_is_missing_is_refused_with_the_fix(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    with pytest.raises(InvalidRequestError, match=r"SCHEDULER: 'LMS Karras' needs the package scipy.*\[samplers\]"):
        make_scheduler("LMS Karras", {})
    assert is_available("euler") and not is_available("lms")


def test_each_call_returns_a_fresh_instance(model_dir):
    from triton_backend.model_info import ModelInfo

    config = ModelInfo.read(model_dir).scheduler_config
    assert make_scheduler("euler", config) is not make_scheduler("euler", config)


@pytest.mark.parametrize("name", ["nope", "DPM++ 2S a", "euler_a_karras", ""])
def test_unknown_name_is_invalid_and_lists_names(name):
    with pytest.raises(InvalidRequestError) as info:
        make_scheduler(name, {})
    assert info.value.field == "SCHEDULER"
    assert "dpmpp_2m_karras" in str(info.value) and "DPM++ 2M Karras" in str(info.value)


@pytest.fixture(scope="module")
def stages(local):
    return local.text_encoder, (lambda *call: unet_forward(local.unet, StepInput.of(*call))), local.vae, local.info


@pytest.mark.parametrize("name", [optional_sampler(name) for name in sorted(EXPECTED)])
def test_each_name_equals_diffusers_with_the_scheduler_it_names(stages, reference, name):
    """Our stages with the table's scheduler equal ``StableDiffusionPipeline`` with the named diffusers scheduler
    built here (for ``dpmpp_sde``: its Brownian tree seeded with the request's seed, as we document)."""
    te, unet, vae, info = stages
    req = GenerationRequest(prompt="a photo of a cat", negative_prompt="blurry", seed=5, steps=4, scheduler=name)
    ours = vae.decode(denoise.run(denoise.prepare_encoded(req, te.encode_request(req), info), unet))

    cls, overrides = EXPECTED[name]
    if cls == "DPMSolverSDEScheduler":
        overrides = {**overrides, "noise_sampler_seed": req.seed}
    ref = reference(req, getattr(diffusers, cls).from_config(reference.base_scheduler.config, **overrides))
    assert np.array_equal(ours, ref) or assert_same_image(ours, ref) is None


@pytest.mark.skipif(not is_available("dpmpp_sde"), reason="torchsde is not installed (the [samplers] extra)")
def test_sde_sampler_is_reproducible(stages):
    """diffusers seeds ``DPMSolverSDEScheduler``'s noise from torch's global generator unless told; ours is seeded by
    the request, so the same request gives the same image."""
    te, unet, vae, info = stages
    req = GenerationRequest(prompt="a cat", seed=9, steps=3, scheduler="DPM++ SDE Karras")
    images = [vae.decode(denoise.run(denoise.prepare_encoded(req, te.encode_request(req), info), unet)) for _ in "ab"]
    assert np.array_equal(*images)
