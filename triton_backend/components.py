"""Load the parts of a diffusers model directory, and read its shape facts without loading weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class ModelInfo:
    """Shape facts every stage needs, read from the sub-model ``config.json`` files."""

    model_dir: Path
    vae_scale_factor: int
    latent_channels: int
    sample_size: int
    cross_attention_dim: int
    scaling_factor: float
    scheduler_config: dict[str, Any]

    @property
    def native_size(self) -> int:
        """Default height/width in pixels, as ``StableDiffusionPipeline`` picks it."""
        return self.sample_size * self.vae_scale_factor

    @classmethod
    def read(cls, model_dir: Path) -> ModelInfo:
        """Read ``unet/``, ``vae/`` and ``scheduler/`` configs; a missing or bad file raises ``ConfigError``."""
        unet = _read_json(model_dir / "unet" / "config.json")
        vae = _read_json(model_dir / "vae" / "config.json")
        sched = _read_json(model_dir / "scheduler" / "scheduler_config.json")
        if unet.get("addition_embed_type") or (model_dir / "text_encoder_2").is_dir():
            raise ConfigError(
                f"{model_dir}: SDXL-style models (text_encoder_2, addition_embed_type="
                f"{unet.get('addition_embed_type')!r}) are not supported yet; SD 1.x/2.x diffusers directories are"
            )
        sample = unet.get("sample_size", 64)
        return cls(
            model_dir=model_dir,
            vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
            latent_channels=int(unet["in_channels"]),
            sample_size=int(sample if isinstance(sample, int) else sample[0]),
            cross_attention_dim=int(unet["cross_attention_dim"]),
            scaling_factor=float(vae.get("scaling_factor", 0.18215)),
            scheduler_config=sched,
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"missing {path}: not a diffusers model directory") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def load_part(cls: Any, model_dir: Path, subfolder: str, device: torch.device, dtype: torch.dtype) -> Any:
    """``cls.from_pretrained(model_dir/subfolder)`` in eval mode on ``device``/``dtype``; errors name the part."""
    try:
        model = cls.from_pretrained(str(model_dir / subfolder), torch_dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - any loader failure fails the model load with the path
        raise ConfigError(f"cannot load {subfolder} from {model_dir}: {exc}") from exc
    return model.to(device).eval().requires_grad_(False)
