import hashlib

import numpy as np
import pytest

from triton_backend.schema import GenerationRequest
from triton_backend.tools.default_model import is_current_default_model, write_default_model

from .helpers import pixel_diff


def _digest(path):
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_deterministic_bytes(model_dir, tmp_path):
    again = write_default_model(tmp_path / "again")
    assert _digest(again) == _digest(model_dir)


def test_sdxl_model_is_deterministic_loadable_and_marked(sdxl_model_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    again = write_default_model(tmp_path / "again", arch="sdxl")
    assert _digest(again) == _digest(sdxl_model_dir)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_model_dir), local_files_only=True)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token != "!"
    assert sorted(p.stem for p in (sdxl_model_dir / "loras").glob("*.safetensors")) == [
        "glow_kohya",
        "ink_kohya",
        "pastel_peft",
    ]
    assert sorted(p.name for p in (sdxl_model_dir / "controlnets").iterdir()) == ["depth", "edges"]
    assert is_current_default_model(sdxl_model_dir, arch="sdxl")
    assert not is_current_default_model(sdxl_model_dir)  # an SD1 default model is asked for: regenerate


@pytest.mark.parametrize("change", [{"prompt": "a red house at night"}, {"seed": 1}, {"target_size": (32, 32)}])
def test_sdxl_outputs_are_sensitive(sdxl_reference, change):
    base = GenerationRequest(prompt="a photo of a cat", seed=0, steps=4)
    a, b = sdxl_reference(base), sdxl_reference(GenerationRequest(**{**base.__dict__, **change}))
    assert pixel_diff(a, b)[1] >= 2.0, change
    assert a.std() > 20


def test_is_a_loadable_sd_pipeline_without_downloads(model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size * 8 == 64
    assert "CLIPTokenizer" in type(pipe.tokenizer).__name__
    ids = pipe.tokenizer("a photo of a cat").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert len(ids) <= 2 + 6  # the local BPE merges whole words, not one token per character
    assert is_current_default_model(model_dir)


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a red house at night"},
        {"seed": 1},
        {"scheduler": "ddim"},
        {"scheduler": "euler_a"},
        {"scheduler": "dpmpp_2m"},
    ],
)
def test_outputs_are_sensitive(reference, change):
    base = GenerationRequest(prompt="a photo of a cat", seed=0, steps=4, scheduler="euler")
    changed = GenerationRequest(**{**base.__dict__, **change})
    a, b = reference(base), reference(changed)
    _, mean = pixel_diff(a, b)
    assert mean >= 2.0, f"{change} changed the image by only {mean:.2f} levels"
    assert a.std() > 20, "the default model must not produce a near-constant image"
    assert not np.array_equal(a, b)
