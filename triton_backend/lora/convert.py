"""LoRA file → per-layer factors, using diffusers' own loaders (every format diffusers reads: PEFT/diffusers,
kohya/A1111 ``lora_unet_…``/``lora_te_…`` with ``.alpha``, old attention-processor keys).

The file is injected into skeleton modules with ``load_lora_into_unet``/``load_lora_into_text_encoder`` exactly as
``pipe.load_lora_weights`` would, then every injected PEFT layer is read back as ``(A, B, scaling)`` with
``scaling = alpha / rank`` (PEFT's value, so ranks, alphas and rank/alpha patterns follow diffusers) and the
adapter is deleted again. The factors are what crosses processes; the UNet computes ``B @ A`` when it patches.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import InvalidRequestError

#: Components a LoRA can touch, as diffusers names them in converted state dicts.
COMPONENTS = ("unet", "text_encoder")


def _lora_layers(module: torch.nn.Module, adapter: str) -> Iterator[tuple[str, torch.nn.Module]]:
    for name, sub in module.named_modules():
        if hasattr(sub, "lora_A") and adapter in getattr(sub, "lora_A", {}):
            yield name, sub


def convert_lora_file(
    path: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None, field: str = "LORA_NAMES"
) -> dict[str, torch.Tensor]:
    """Factors of every LoRA layer in ``path``: ``{component}:{module}.lora_A|lora_B|scaling`` (float32, CPU).

    ``module`` is the layer's name in the plain (un-injected) model, e.g.
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``. A file that is not a LoRA for this model
    raises ``InvalidRequestError`` naming ``field``.
    """
    from diffusers import StableDiffusionPipeline

    adapter = f"sd_{uuid.uuid4().hex[:8]}"
    try:
        state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(path), return_lora_metadata=True, local_files_only=True
        )
    except Exception as exc:  # noqa: BLE001 - corrupt/foreign files
        raise InvalidRequestError(field, f"{path.name}: not a readable LoRA file ({exc})") from None
    if not any(k.startswith("unet.") or k.startswith("text_encoder.") for k in state_dict):
        raise InvalidRequestError(field, f"{path.name}: no UNet or text-encoder LoRA layers found")
    out: dict[str, torch.Tensor] = {}
    targets = [("unet", unet)] + ([("text_encoder", text_encoder)] if text_encoder is not None else [])
    for component, model in targets:
        if not any(k.startswith(component + ".") for k in state_dict):
            continue
        try:
            if component == "unet":
                StableDiffusionPipeline.load_lora_into_unet(
                    state_dict, alphas, unet=model, adapter_name=adapter, metadata=metadata
                )
            else:
                StableDiffusionPipeline.load_lora_into_text_encoder(
                    state_dict,
                    alphas,
                    text_encoder=model,
                    prefix="text_encoder",
                    adapter_name=adapter,
                    metadata=metadata,
                )
        except Exception as exc:  # noqa: BLE001 - shape mismatch = a LoRA for another architecture
            _delete(model, adapter)
            raise InvalidRequestError(
                field, f"{path.name}: does not match this model's {component} ({type(exc).__name__}: {exc})"
            ) from None
        try:
            for name, layer in _lora_layers(model, adapter):
                key = f"{component}:{name.removesuffix('.base_layer')}"
                out[key + ".lora_A"] = layer.lora_A[adapter].weight.detach().float().cpu().contiguous()
                out[key + ".lora_B"] = layer.lora_B[adapter].weight.detach().float().cpu().contiguous()
                out[key + ".scaling"] = torch.tensor(float(layer.scaling[adapter]))
        finally:
            _delete(model, adapter)
    if not out:
        raise InvalidRequestError(field, f"{path.name}: no layer of this model matched")
    return out


def _delete(model: torch.nn.Module, adapter: str) -> None:
    try:
        if hasattr(model, "delete_adapters"):
            model.delete_adapters([adapter])
        elif hasattr(model, "delete_adapter"):
            model.delete_adapter(adapter)
    except Exception:  # noqa: BLE001,S110 - nothing was injected
        pass


def file_signature(path: Path) -> str:
    """Identity of a file's current content for caching: a changed file is never served stale."""
    st = os.stat(path)
    return f"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"
