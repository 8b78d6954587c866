"""Load the parts of a diffusers model directory, and read its shape facts without loading weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

#: The architectures served, as :attr:`ModelInfo.arch` names them.
ARCH_SD = "sd"
ARCH_SDXL = "sdxl"


@dataclass(frozen=True)
class ModelInfo:
    """Shape facts every stage needs, read from the sub-model ``config.json`` files (no weights are loaded).

    The architecture comes from the model's own config: a UNet with ``addition_embed_type="text_time"`` and a
    ``text_encoder_2`` is SDXL (pooled text embedding + 6 time ids as added conditioning); no added embedding is
    SD 1.x/2.x. Anything else is refused at load with a clear message.
    """

    model_dir: Path
    vae_scale_factor: int
    latent_channels: int
    sample_size: int
    cross_attention_dim: int
    scaling_factor: float
    scheduler_config: dict[str, Any]
    arch: str = ARCH_SD
    #: SDXL: width of the pooled text embedding (``text_encoder_2.config.projection_dim``); 0 for SD.
    pooled_dim: int = 0
    #: SDXL: ``model_index.json``'s ``force_zeros_for_empty_prompt`` (no negative prompt → zero embeddings).
    force_zeros_for_empty_prompt: bool = False
    #: VAE ``latents_mean``/``latents_std`` when the config has them (decode un-normalizes with them).
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    #: VAE config ``force_upcast`` (diffusers' default True): SDXL pipelines decode in float32 instead of float16.
    vae_force_upcast: bool = True
    #: The UNet's input channels: ``latent_channels``, or ``2 * latent_channels + 1`` for an inpainting UNet (the
    #: latents, the mask and the masked image's latents, concatenated).
    unet_in_channels: int = 4

    @property
    def inpainting_unet(self) -> bool:
        return self.unet_in_channels != self.latent_channels

    @property
    def is_sdxl(self) -> bool:
        return self.arch == ARCH_SDXL

    @property
    def arch_label(self) -> str:
        """For error messages: ``SDXL`` or ``SD1.x/2.x``."""
        return "SDXL" if self.is_sdxl else "SD1.x/2.x"

    def check_added(self, rows: int, text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None) -> None:
        """A step's added conditioning (``TEXT_EMBEDS [rows, P]``, ``TIME_IDS [rows, 6]``, FP32) must fit this model:
        required by SDXL, refused by SD 1.x/2.x; raises ``InvalidRequestError`` naming the tensor.
        """
        from .errors import InvalidRequestError

        for name, t, width in (("TEXT_EMBEDS", text_embeds, self.pooled_dim), ("TIME_IDS", time_ids, 6)):
            if not self.is_sdxl:
                if t is not None:
                    raise InvalidRequestError(name, f"is SDXL added conditioning; this model is {self.arch_label}")
            elif t is None or tuple(t.shape) != (rows, width) or t.dtype != torch.float32:
                got = None if t is None else f"{list(t.shape)} {t.dtype}"
                raise InvalidRequestError(name, f"expected [{rows}, {width}] FP32 for this SDXL model, got {got}")

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
        arch, pooled_dim, force_zeros = _architecture(model_dir, unet)
        sample = unet.get("sample_size", 64)
        facts = cls.vae_facts(vae)
        return cls(
            model_dir=model_dir,
            **facts,
            unet_in_channels=_unet_in_channels(model_dir, unet, facts["latent_channels"]),
            sample_size=int(sample if isinstance(sample, int) else sample[0]),
            cross_attention_dim=int(unet["cross_attention_dim"]),
            scheduler_config=sched,
            arch=arch,
            pooled_dim=pooled_dim,
            force_zeros_for_empty_prompt=force_zeros,
        )

    @staticmethod
    def vae_facts(vae: dict[str, Any]) -> dict[str, Any]:
        """What a VAE config (``vae/config.json``) tells, as :class:`ModelInfo` fields; diffusers' defaults where
        absent.
        """
        mean, std = vae.get("latents_mean"), vae.get("latents_std")
        if mean is None or std is None:
            mean = std = None
        return {
            "vae_scale_factor": 2 ** (len(vae["block_out_channels"]) - 1),
            "latent_channels": int(vae.get("latent_channels", 4)),
            "scaling_factor": float(vae.get("scaling_factor", 0.18215)),
            "latents_mean": None if mean is None else tuple(mean),
            "latents_std": None if std is None else tuple(std),
            "vae_force_upcast": bool(vae.get("force_upcast", True)),
        }


def _unet_in_channels(model_dir: Path, unet: dict[str, Any], latent_channels: int) -> int:
    """The UNet's ``in_channels``: the VAE's latent channels, or those of an inpainting UNet; else ``ConfigError``."""
    channels = int(unet["in_channels"])
    if channels not in (latent_channels, 2 * latent_channels + 1):
        raise ConfigError(
            f"{model_dir}: UNet in_channels={channels}; expected {latent_channels} (the VAE's latent channels) or "
            f"{2 * latent_channels + 1} (an inpainting UNet)"
        )
    return channels


def _architecture(model_dir: Path, unet: dict[str, Any]) -> tuple[str, int, bool]:
    """``(arch, pooled_dim, force_zeros_for_empty_prompt)`` from the configs, or ``ConfigError``."""
    kind = unet.get("addition_embed_type")
    if kind is None:
        return ARCH_SD, 0, False
    if kind != "text_time":
        raise ConfigError(f"{model_dir}: UNet addition_embed_type={kind!r} is not supported (SD1.x/2.x or SDXL)")
    if not (model_dir / "text_encoder_2").is_dir() or not (model_dir / "text_encoder").is_dir():
        raise ConfigError(
            f"{model_dir}: an SDXL UNet without both text_encoder and text_encoder_2 (e.g. the refiner) is not "
            "supported; serve an SDXL base model"
        )
    te2 = _read_json(model_dir / "text_encoder_2" / "config.json")
    pooled = int(te2.get("projection_dim") or te2["hidden_size"])
    time_dim = int(unet.get("addition_time_embed_dim") or 0)
    expected = unet.get("projection_class_embeddings_input_dim")
    if expected is not None and int(expected) != 6 * time_dim + pooled:
        raise ConfigError(
            f"{model_dir}: unet projection_class_embeddings_input_dim={expected} != 6 * addition_time_embed_dim "
            f"({time_dim}) + text_encoder_2 projection_dim ({pooled})"
        )
    index = model_dir / "model_index.json"
    force_zeros = bool(_read_json(index).get("force_zeros_for_empty_prompt", True)) if index.is_file() else True
    return ARCH_SDXL, pooled, force_zeros


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
    except Exception as exc:
        raise ConfigError(f"cannot load {subfolder} from {model_dir}: {exc}") from exc
    return model.to(device).eval().requires_grad_(False)
