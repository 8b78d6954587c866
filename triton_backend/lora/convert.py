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
from typing import Any

import torch

from ..config import StageConfig
from ..errors import InvalidRequestError

#: Components a LoRA can touch, as diffusers names them in converted state dicts.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _lora_layers(module: torch.nn.Module, adapter: str) -> Iterator[tuple[str, Any]]:
    """The PEFT LoRA layers ``adapter`` injected into ``module``, by module name."""
    from peft.tuners.lora import LoraLayer  # (here, not at the top: every stage process imports this module)

    for name, sub in module.named_modules():
        if isinstance(sub, LoraLayer) and adapter in sub.lora_A:
            yield name, sub


def load_skeletons(cfg: StageConfig) -> dict[str, torch.nn.Module]:
    """The conversion skeletons of the served model by diffusers component name: its own copies of ``unet`` and
    ``text_encoder`` (and ``text_encoder_2`` for SDXL), separate from the modules that serve requests.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ..model_info import ModelInfo, load_part

    parts = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}
    if ModelInfo.read(cfg.model_dir).is_sdxl:
        parts["text_encoder_2"] = CLIPTextModelWithProjection
    return {c: load_part(cls, cfg.model_dir, c, cfg.device, cfg.dtype) for c, cls in parts.items()}


def _layer_count(state_dict: dict[str, torch.Tensor], component: str) -> int:
    """LoRA layers of ``component`` in a converted state dict (one down/A weight per layer, in every key style)."""
    ends = (".lora_A.weight", ".down.weight")
    return sum(1 for k in state_dict if k.startswith(component + ".") and k.endswith(ends))


def convert_lora_file(
    path: Path, components: dict[str, torch.nn.Module], field: str = "LORA_NAMES"
) -> dict[str, torch.Tensor]:
    """Factors of every LoRA layer in ``path``: ``{component}:{module}.lora_A|lora_B|scaling`` (float32, CPU); for a
    LyCORIS file (LoHa, LoKr) the dense ``{component}:{module}.delta`` instead (:mod:`triton_backend.lora.lycoris`).

    ``components`` are skeletons of the served model by diffusers name (``unet``, ``text_encoder`` and, for SDXL,
    ``text_encoder_2``). ``module`` is the layer's name in the plain (un-injected) model, e.g.
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``. A file that is not a LoRA for this model
    raises ``InvalidRequestError`` naming ``field``, the LoRA and the mismatch: layers of a component the model
    lacks (an SDXL LoRA's ``text_encoder_2`` on an SD model), layers the model lacks, or layers of another shape.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from .lycoris import convert_lycoris, is_lycoris

    try:
        raw = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - corrupt/foreign files
        raise InvalidRequestError(field, f"{path.stem}: not a readable LoRA file ({exc})") from None
    if is_lycoris(list(raw)):
        return convert_lycoris(raw, components, path.stem, field)
    sdxl = "text_encoder_2" in components
    pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    arch = "SDXL" if sdxl else "SD1.x/2.x"
    adapter = f"sd_{uuid.uuid4().hex[:8]}"
    # As the SDXL pipeline's load_lora_weights: the UNet config maps SGM-style kohya keys (input_blocks_…).
    extra = {"unet_config": components["unet"].config} if sdxl else {}
    try:
        state_dict, alphas, metadata = pipeline.lora_state_dict(
            str(path), return_lora_metadata=True, local_files_only=True, **extra
        )
    except Exception as exc:  # noqa: BLE001 - corrupt/foreign files
        raise InvalidRequestError(field, f"{path.stem}: not a readable LoRA file ({exc})") from None
    present = [c for c in COMPONENTS if any(k.startswith(c + ".") for k in state_dict)]
    if not present:
        raise InvalidRequestError(field, f"{path.stem}: no UNet or text-encoder LoRA layers found")
    for component in present:
        if component not in components:
            raise InvalidRequestError(
                field, f"{path.stem}: has {component} layers (an SDXL LoRA); this model is {arch}, without {component}"
            )
    out: dict[str, torch.Tensor] = {}
    for component in present:
        model = components[component]
        try:
            if component == "unet":
                pipeline.load_lora_into_unet(state_dict, alphas, unet=model, adapter_name=adapter, metadata=metadata)
            else:
                pipeline.load_lora_into_text_encoder(
                    state_dict, alphas, text_encoder=model, prefix=component, adapter_name=adapter, metadata=metadata
                )
        except Exception as exc:  # noqa: BLE001 - shape mismatch = a LoRA for another architecture
            _delete(model, adapter)
            raise InvalidRequestError(
                field,
                f"{path.stem}: a LoRA for another architecture: its {component} layers do not match this {arch} "
                f"model ({type(exc).__name__}: {str(exc)[:300]})",
            ) from None
        try:
            layers = list(_lora_layers(model, adapter))
            expected = _layer_count(state_dict, component)
            if len(layers) < expected:
                raise InvalidRequestError(
                    field,
                    f"{path.stem}: a LoRA for another architecture: only {len(layers)} of its {expected} {component} "
                    f"layers exist in this {arch} model",
                )
            for name, layer in layers:
                key = f"{component}:{name.removesuffix('.base_layer')}"
                out[key + ".lora_A"] = layer.lora_A[adapter].weight.detach().float().cpu().contiguous()
                out[key + ".lora_B"] = layer.lora_B[adapter].weight.detach().float().cpu().contiguous()
                out[key + ".scaling"] = torch.tensor(float(layer.scaling[adapter]))
        finally:
            _delete(model, adapter)
    if not out:
        raise InvalidRequestError(field, f"{path.stem}: no layer of this model matched")
    return out


def _delete(model: torch.nn.Module, adapter: str) -> None:
    """Remove ``adapter``: diffusers models have ``delete_adapters``, transformers models ``delete_adapter``."""
    try:
        if (delete_many := getattr(model, "delete_adapters", None)) is not None:
            delete_many([adapter])
        elif (delete_one := getattr(model, "delete_adapter", None)) is not None:
            delete_one(adapter)
    except Exception:  # noqa: BLE001 - nothing was injected
        pass


def file_signature(path: Path) -> str:
    """Identity of a file's current content for caching: a changed file is never served stale."""
    st = os.stat(path)
    return f"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"
