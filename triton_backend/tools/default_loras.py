"""LoRAs for the default model, written in the on-disk formats users find: diffusers/PEFT and kohya/A1111.

Deterministic (fixed seeds). Each one clearly changes the image (tests check it): different ranks, alphas that
differ from the rank, Linear, 1x1-conv and 3x3-conv layers, and text-encoder layers in both formats.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel


def _kohya(
    model: torch.nn.Module, prefix: str, suffixes: tuple[str, ...], rank: int, alpha: float, std: float, seed: int
) -> dict[str, torch.Tensor]:
    """kohya/A1111 keys: ``{prefix}{module_path_with_underscores}.lora_down.weight|lora_up.weight|alpha``."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, module in sorted(model.named_modules()):
        if not name.endswith(suffixes):
            continue
        key = prefix + name.replace(".", "_")
        if isinstance(module, torch.nn.Linear):
            down = torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
            up = torch.randn(module.out_features, rank, generator=g) * std
        elif isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            down = torch.randn(rank, module.in_channels, kh, kw, generator=g) / (module.in_channels * kh * kw) ** 0.5
            up = torch.randn(module.out_channels, rank, 1, 1, generator=g) * std
        else:
            continue
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def _metadata(config) -> dict:
    """PEFT config as saved metadata, made deterministic (no temp paths, sorted target set)."""
    return {**config.to_dict(), "base_model_name_or_path": None, "target_modules": sorted(config.target_modules)}


def _text_encoders(model_dir: Path, arch: str) -> dict[str, PreTrainedModel]:
    """Fresh text encoders of the model by diffusers component name (PEFT leaves wrappers behind on delete)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out: dict[str, PreTrainedModel] = {"text_encoder": CLIPTextModel.from_pretrained(str(model_dir / "text_encoder"))}
    if arch == "sdxl":
        out["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(str(model_dir / "text_encoder_2"))
    return out


def write_default_loras(model_dir: Path, arch: str = "sd1") -> list[Path]:
    """Write ``<model_dir>/loras/{pastel_peft,ink_kohya,glow_kohya}.safetensors`` for the ``arch`` model.

    With ``arch="sdxl"`` the text-encoder layers go to both encoders: PEFT keys ``text_encoder.…`` and
    ``text_encoder_2.…``; kohya keys ``lora_te1_…`` and ``lora_te2_…`` (SDXL's kohya naming).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    out = model_dir / "loras"
    out.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(str(model_dir / "unet"))
    encoders = _text_encoders(model_dir, arch)

    # 1. diffusers/PEFT format (what `save_lora_weights` writes), UNet attention + text encoder(s), r=4, alpha != r.
    torch.manual_seed(10)
    unet_cfg = LoraConfig(
        r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    te_cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], init_lora_weights=False
    )
    unet.add_adapter(unet_cfg, adapter_name="pastel")
    for encoder in encoders.values():
        encoder.add_adapter(te_cfg, adapter_name="pastel")
    with torch.no_grad():
        for model in (unet, *encoders.values()):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.6)
    layers = {f"{c}_lora_layers": get_peft_model_state_dict(m, adapter_name="pastel") for c, m in encoders.items()}
    metadata = {f"{c}_lora_adapter_metadata": _metadata(te_cfg) for c in encoders}
    pipeline = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    pipeline.save_lora_weights(
        str(out / "_pastel"),
        unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="pastel"),
        unet_lora_adapter_metadata=_metadata(unet_cfg),
        **layers,
        **metadata,
    )
    # Re-save with a single metadata key: safetensors writes metadata from a hash map, so with two keys
    # ("format", "lora_adapter_metadata") the byte order would differ between runs.
    saved = out / "_pastel" / "pytorch_lora_weights.safetensors"
    with safe_open(str(saved), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        adapter_metadata = f.metadata()["lora_adapter_metadata"]
    save_file(tensors, str(out / "pastel_peft.safetensors"), metadata={"lora_adapter_metadata": adapter_metadata})
    saved.unlink()
    (out / "_pastel").rmdir()
    # Fresh modules for the kohya files (PEFT leaves wrapper layers behind after deleting an adapter).
    unet = UNet2DConditionModel.from_pretrained(str(model_dir / "unet"))
    encoders = _text_encoders(model_dir, arch)

    # 2. kohya format, UNet only: attention, feed-forward and the 1x1-conv proj_in/proj_out, rank 8, alpha 4.
    ink = _kohya(
        unet, "lora_unet_", ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in", "proj_out"), 8, 4.0, 0.5, 11
    )
    save_file(ink, str(out / "ink_kohya.safetensors"))

    # 3. kohya format, rank 2, alpha 1: cross-attention + text encoder MLP (lora_te_… / lora_te1_… + lora_te2_…).
    glow = _kohya(unet, "lora_unet_", ("attn2.to_k", "attn2.to_v"), 2, 1.0, 1.5, 12)
    te_prefixes = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"} if arch == "sdxl" else {}
    for seed, (component, encoder) in enumerate(encoders.items(), start=13):
        glow.update(_kohya(encoder, te_prefixes.get(component, "lora_te_"), ("mlp.fc1", "mlp.fc2"), 2, 1.0, 1.0, seed))
    save_file(glow, str(out / "glow_kohya.safetensors"))
    return sorted(out.glob("*.safetensors"))
