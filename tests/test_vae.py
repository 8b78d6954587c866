"""A replacement VAE (``vae``'s ``vae_dir``): decodes as diffusers does with that VAE; another latent space is
refused at load by name.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from triton_backend.config import StageConfig
from triton_backend.errors import ConfigError
from triton_backend.stages.vae import Vae


def _other_vae(model_dir, tmp_path, **config):
    """The model's VAE with other decoder weights (and ``config`` changes): a stand-in for e.g. the fp16-fix VAE."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(model_dir / "vae"))
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.mul_(0.9).add_(0.01)
    out = tmp_path / "other-vae"
    vae.save_pretrained(str(out))
    if config:
        path = out / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | config))
    return out


def test_a_replacement_vae_decodes_as_diffusers_with_it(model_dir, tmp_path):
    from diffusers import AutoencoderKL

    other = _other_vae(model_dir, tmp_path, force_upcast=False)
    ours = Vae(StageConfig.from_params("vae", {"model_dir": str(model_dir), "vae_dir": str(other)}))
    own = Vae(StageConfig.from_params("vae", {"model_dir": str(model_dir)}))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).numpy()
    reference = AutoencoderKL.from_pretrained(str(other))
    with torch.inference_mode():
        image = reference.decode(torch.from_numpy(latents) / reference.config.scaling_factor).sample
    expected = ((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()[0] * 255).round().astype(np.uint8)
    decoded = ours.decode(latents)
    assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(decoded.astype(int) - own.decode(latents).astype(int)).mean() > 1  # (it is the other VAE)
    assert ours.info.vae_force_upcast is False


@pytest.mark.parametrize(("change", "needle"), [({"scaling_factor": 0.5}, "scaling_factor"), ({}, "not a diffusers")])
def test_a_vae_of_another_latent_space_is_refused_at_load(model_dir, tmp_path, change, needle):
    other = _other_vae(model_dir, tmp_path, **change)
    if not change:
        shutil.rmtree(other)
        other.mkdir()
    with pytest.raises(ConfigError, match=needle):
        Vae(StageConfig.from_params("vae", {"model_dir": str(model_dir), "vae_dir": str(other)}))
