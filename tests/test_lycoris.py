"""LyCORIS files (LoHa, LoKr) in the LoRA store: their deltas are A1111's, and a request with one equals the
diffusers pipeline with those deltas added to its weights.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from triton_backend.errors import InvalidRequestError
from triton_backend.pipeline import LocalPipeline
from triton_backend.schema import GenerationRequest

from .helpers import assert_same_image, pixel_diff

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"
TE = "encoder.layers.0.self_attn.q_proj"


def _kohya(component: str, name: str) -> str:
    return ("lora_unet_" if component == "unet" else "lora_te_text_model_") + name.replace(".", "_")


def lycoris_file(pipe: LocalPipeline, kind: str) -> tuple[dict, dict]:
    """A LoHa or LoKr file for three layers (a Linear, a 3x3 conv, a text-encoder Linear) and the deltas A1111's
    formulas give, written out here: ``{(component, module): delta}``.
    """
    g = torch.Generator().manual_seed(7)
    te = pipe.text_encoder.models[0]
    modules = {"unet": dict(pipe.lora_skeletons["unet"].named_modules()), "text_encoder": dict(te.named_modules())}
    tensors, deltas = {}, {}
    for component, name in (("unet", ATTN), ("unet", CONV), ("text_encoder", TE)):
        shape = modules[component][name].weight.shape
        out, rest = shape[0], int(np.prod(shape[1:]))
        key = _kohya(component, name)
        if kind == "loha":
            r, alpha = 2, 1.0
            w1a, w2a = torch.randn(out, r, generator=g) * 0.3, torch.randn(out, r, generator=g) * 0.3
            w1b, w2b = torch.randn(r, rest, generator=g) * 0.3, torch.randn(r, rest, generator=g) * 0.3
            tensors |= {f"{key}.hada_w1_a": w1a, f"{key}.hada_w1_b": w1b, f"{key}.hada_w2_a": w2a,
                        f"{key}.hada_w2_b": w2b, f"{key}.alpha": torch.tensor(alpha)}  # fmt: skip
            deltas[(component, name)] = ((w1a @ w1b) * (w2a @ w2b)).reshape(shape) * alpha / r
        else:  # LoKr: w1 whole, w2 factored (rank 2): kron(w1, w2a @ w2b) * alpha / 2
            f_out, f_in = 2, 2
            w1 = torch.randn(f_out, f_in, generator=g) * 0.5
            w2a = torch.randn(out // f_out, 2, generator=g) * 0.3
            w2b = torch.randn(2, rest // f_in, generator=g) * 0.3
            if len(shape) == 4:  # a conv: w2 is 4-d [out/f, in/f, k, k]; w1 [f, f] is expanded
                w2 = torch.randn(out // f_out, shape[1] // f_in, *shape[2:], generator=g) * 0.3
                tensors |= {f"{key}.lokr_w1": w1, f"{key}.lokr_w2": w2}
                deltas[(component, name)] = torch.kron(w1[:, :, None, None], w2).reshape(shape)
                continue
            tensors |= {f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b,
                        f"{key}.alpha": torch.tensor(1.0)}  # fmt: skip
            deltas[(component, name)] = torch.kron(w1, w2a @ w2b).reshape(shape) * 1.0 / 2
    return tensors, deltas


@pytest.fixture(scope="module")
def work(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lyco") / "model"
    shutil.copytree(model_dir, out, symlinks=True, ignore=shutil.ignore_patterns("loras"))
    (out / "loras").mkdir()
    pipe = LocalPipeline(out)
    from triton_backend.config import StageConfig
    from triton_backend.lora.convert import load_skeletons

    pipe.lora_skeletons = load_skeletons(StageConfig.from_params("lora_manager", {"model_dir": str(out)}))
    yield out, pipe
    pipe.close()


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_a_lycoris_file_equals_diffusers_with_a1111s_deltas(work, kind):
    import diffusers

    root, pipe = work
    tensors, deltas = lycoris_file(pipe, kind)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / "loras" / f"{kind}.safetensors"))
    req = GenerationRequest(prompt="a castle", seed=3, steps=4, lora_names=(kind,), lora_scales=(0.8,), lora_bound_k=0)
    ours = pipe.generate(req).image
    plain = pipe.generate(GenerationRequest(prompt="a castle", seed=3, steps=4)).image
    assert pixel_diff(ours, plain)[1] > 0.5

    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(root), safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for (component, name), delta in deltas.items():
            getattr(ref, component).get_submodule(name).weight += 0.8 * delta
    expected = ref(req.prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="np")
    assert_same_image(ours, (expected.images[0] * 255).round().astype(np.uint8))
    assert_same_image(pipe.generate(GenerationRequest(prompt="a castle", seed=3, steps=4)).image, plain)  # restored


def test_a_lycoris_file_for_another_model_is_refused_naming_lora_names(work):
    root, pipe = work
    parts = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    save_file(
        {f"lora_unet_no_such_layer.{p}": torch.zeros(2, 2) for p in parts}, str(root / "loras" / "stray.safetensors")
    )
    with pytest.raises(InvalidRequestError) as info:
        pipe.generate(GenerationRequest(prompt="x", steps=2, lora_names=("stray",), lora_bound_k=0))
    assert info.value.field == "LORA_NAMES" and "no_such_layer" in str(info.value)


def test_an_sdxl_loha_reaches_the_unet_and_both_text_encoders(sdxl_model_dir, tmp_path):
    """kohya names with ``lora_te1_``/``lora_te2_``; the deltas are checked against A1111's formula in the weights
    the stages patch (the image path is the SD one above)."""
    from triton_backend.config import StageConfig
    from triton_backend.lora.convert import convert_lora_file, load_skeletons

    skeletons = load_skeletons(StageConfig.from_params("lora_manager", {"model_dir": str(sdxl_model_dir)}))
    g = torch.Generator().manual_seed(2)
    tensors, expected = {}, {}

    def first(component: str, end: str) -> str:
        return next(n for n, _ in skeletons[component].named_modules() if n.endswith(end))

    for component, prefix, name in (
        ("unet", "lora_unet_", first("unet", "attn1.to_q")),
        ("text_encoder", "lora_te1_", first("text_encoder", "self_attn.q_proj")),
        ("text_encoder_2", "lora_te2_", first("text_encoder_2", "self_attn.q_proj")),
    ):
        shape = skeletons[component].get_submodule(name).weight.shape
        sizes = {
            "hada_w1_a": (shape[0], 2),
            "hada_w1_b": (2, shape[1]),
            "hada_w2_a": (shape[0], 2),
            "hada_w2_b": (2, shape[1]),
        }
        w = {p: torch.randn(*size, generator=g) for p, size in sizes.items()}
        key = (
            prefix
            + ("" if component == "unet" or name.startswith("text_model.") else "text_model_")
            + name.replace(".", "_")
        )
        tensors |= {f"{key}.{p}": t for p, t in w.items()} | {f"{key}.alpha": torch.tensor(4.0)}
        expected[f"{component}:{name}.delta"] = (
            (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * 2
        )
    path = tmp_path / "xl_loha.safetensors"
    save_file(tensors, str(path))
    out = convert_lora_file(path, skeletons)
    assert out.keys() == expected.keys()
    assert all(torch.allclose(out[k], expected[k], atol=1e-5) for k in expected)
