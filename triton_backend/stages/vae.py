"""Stage ``vae``: latents → uint8 RGB image, as diffusers' ``vae.decode`` + ``VaeImageProcessor.postprocess``."""

from __future__ import annotations

import numpy as np
import torch

from ..config import StageConfig
from ..errors import InvalidRequestError
from ..model_info import ModelInfo, load_part


class VaeDecoder:
    """Decode ``LATENTS [1, C, h, w]`` float32 into ``IMAGE [h*f, w*f, 3]`` uint8 (f = the VAE scale factor)."""

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg
        self.info = ModelInfo.read(cfg.model_dir)
        self.dtype = self.decode_dtype(self.info, cfg.dtype)
        from diffusers import AutoencoderKL  # (here, not at the top: every stage process imports this module)

        self.model = load_part(AutoencoderKL, cfg.model_dir, "vae", cfg.device, self.dtype)
        if cfg.plan.channels_last:
            # The decoder's weights in NHWC order, so its convolutions (the decode's time, at full image size near
            # the end) run oneDNN's channels-last kernels and their outputs stay NHWC. Measured on 2 cores: a
            # 128x128 decode 20.9 -> 14.3 ms (SD1 ``cpu`` preset), SDXL 22.3 -> 15.8 ms, 512x512 464 -> 331 ms; the
            # same image within float rounding (at most 1 uint8 level). Not measured on a GPU yet, so the plan's
            # ``auto`` leaves it off there.
            self.model.to(memory_format=torch.channels_last)

    @staticmethod
    def decode_dtype(info: ModelInfo, dtype: torch.dtype) -> torch.dtype:
        """SDXL's VAE overflows in float16: like the SDXL pipelines (``force_upcast``), decode in float32 then."""
        if info.is_sdxl and dtype == torch.float16 and info.vae_force_upcast:
            return torch.float32
        return dtype

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Decode one latent; the uint8 conversion is diffusers' ``numpy_to_pil``: ``(x * 255).round()``."""
        if latents.ndim != 4 or latents.shape[0] != 1 or latents.shape[1] != self.info.latent_channels:
            raise InvalidRequestError(
                "LATENTS", f"expected shape [1, {self.info.latent_channels}, h, w], got {list(latents.shape)}"
            )
        if latents.dtype != np.float32:
            raise InvalidRequestError("LATENTS", f"expected FP32, got {latents.dtype}")
        z = torch.from_numpy(latents).to(self.cfg.device, self.dtype)
        info = self.info
        if info.latents_mean is not None and info.latents_std is not None:  # SDXL-style VAE config
            mean = torch.tensor(info.latents_mean).view(1, -1, 1, 1).to(z.device, z.dtype)
            std = torch.tensor(info.latents_std).view(1, -1, 1, 1).to(z.device, z.dtype)
            z = z * std / info.scaling_factor + mean
        else:
            z = z / info.scaling_factor
        with self.cfg.compute():
            image = self.model.decode(z, return_dict=False)[0]
            image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return (image[0] * 255).round().astype(np.uint8)

    def handle(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Triton entry: ``LATENTS`` → ``IMAGE``."""
        if "LATENTS" not in tensors:
            raise InvalidRequestError("LATENTS", "is required")
        return {"IMAGE": self.decode(tensors["LATENTS"])}
