"""Single-file checkpoints: one in the original layout, written from a generated model, converts back to the same
weights through diffusers' single-file loaders, offline; ``serve --model-dir FILE`` converts it once.
"""

from __future__ import annotations

import subprocess

import pytest
from safetensors.torch import load_file, save_file

from triton_backend.errors import ConfigError
from triton_backend.tools.convert import convert_checkpoint, detect_arch

from .checkpoints import write_original_checkpoint
from .helpers import BIN


@pytest.fixture(scope="module")
def checkpoint(model_dir, tmp_path_factory):
    return write_original_checkpoint(model_dir, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def test_a_checkpoint_converts_to_the_weights_it_was_written_from(model_dir, checkpoint, tmp_path):
    assert detect_arch(checkpoint) == "sd1"
    out = convert_checkpoint(checkpoint, tmp_path / "converted", config=model_dir)
    for part, name in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        ours, theirs = (
            load_file(str(out / part / f"{name}.safetensors")),
            load_file(str(model_dir / part / f"{name}.safetensors")),
        )
        assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours), part
    assert (out / "tokenizer").is_dir() and (out / "model_index.json").is_file()


def test_serve_converts_a_checkpoint_once_into_the_cache(checkpoint, monkeypatch, tmp_path):
    from triton_backend.serving import cli

    monkeypatch.setenv("SWIFTDIFFUSION_CACHE", str(tmp_path / "cache"))
    first = cli._ensure_model_dir(str(checkpoint))
    assert (first / "model_index.json").is_file() and first.is_relative_to(tmp_path / "cache")
    stamp = (first / "model_index.json").stat().st_mtime_ns
    assert cli._ensure_model_dir(str(checkpoint)) == first and (first / "model_index.json").stat().st_mtime_ns == stamp


def test_an_unknown_or_mismatched_checkpoint_is_refused_naming_what_to_pass(checkpoint, sdxl_model_dir, tmp_path):
    import torch

    odd = tmp_path / "odd.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(odd))
    with pytest.raises(ConfigError, match=r"cannot tell its architecture.*--arch sd1 or --arch sdxl"):
        convert_checkpoint(odd, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"does not fit the sdxl architecture.*--config"):
        convert_checkpoint(checkpoint, tmp_path / "out", arch="sdxl", config=sdxl_model_dir)
    run = subprocess.run([str(BIN), "convert", str(odd), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
