"""Stage ``vae``: latents → uint8 RGB images, as diffusers' ``vae.decode`` + ``VaeImageProcessor.postprocess``;
and, for ``img2img``, images → the latent distributions diffusers' img2img and inpainting pipelines sample from.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ..config import StageConfig
from ..errors import ConfigError, InvalidRequestError
from ..model_info import ModelInfo, load_part
from ..schema import VAE_ENCODE_INPUTS, parse_request


class Vae:
    """Decode ``LATENTS [n, C, h, w]`` float32 into ``IMAGES [n, h*f, w*f, 3]`` uint8 (f = the VAE scale factor);
    encode ``INIT_IMAGE`` (and ``MASK_IMAGE``) for ``img2img``.
    """

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg
        self.info = ModelInfo.read(cfg.model_dir)
        vae_dir = Path(cfg.params["vae_dir"]) if cfg.params.get("vae_dir") else cfg.model_dir / "vae"
        if cfg.params.get("vae_dir"):
            self.info = replacement_vae(self.info, vae_dir)
        self.dtype = self.decode_dtype(self.info, cfg.dtype)
        self.limits = dataclasses.replace(cfg.limits, size_multiple=self.info.vae_scale_factor)
        from diffusers import AutoencoderKL  # (here, not at the top: every stage process imports this module)

        self.model = load_part(AutoencoderKL, vae_dir.parent, vae_dir.name, cfg.device, self.dtype)
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

    def decode_all(self, latents: np.ndarray) -> np.ndarray:
        """``[n, C, h, w]`` → ``[n, H, W, 3]``, one image at a time (each equal to its request decoded alone)."""
        if latents.ndim != 4 or not 1 <= latents.shape[0] <= 64 or latents.shape[1] != self.info.latent_channels:
            raise InvalidRequestError(
                "LATENTS", f"expected shape [n, {self.info.latent_channels}, h, w], got {list(latents.shape)}"
            )
        return np.stack([self.decode(latents[i : i + 1]) for i in range(latents.shape[0])])

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Decode one latent; the uint8 conversion is diffusers' ``numpy_to_pil``: ``(x * 255).round()``."""
        if latents.ndim != 4 or latents.shape[0] != 1 or latents.shape[1] != self.info.latent_channels:
            raise InvalidRequestError(
                "LATENTS", f"expected shape [1, {self.info.latent_channels}, h, w], got {list(latents.shape)}"
            )
        if latents.dtype != np.float32:
            raise InvalidRequestError("LATENTS", f"expected FP32, got {latents.dtype}")
        z = torch.from_numpy(np.ascontiguousarray(latents)).to(self.cfg.device, self.dtype)
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

    @torch.inference_mode()
    def encode(self, init_image: np.ndarray, mask_image: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``INIT_MOMENTS``: the latent distribution's parameters (diffusers' ``vae.encode(image).latent_dist``,
        mean and log-variance, ``[1, 2C, h, w]``) of the image preprocessed as the pipelines do
        (``VaeImageProcessor``: ``[-1, 1]``). With a mask (``[H, W]``, binarized by diffusers' mask processor):
        ``MASKED_MOMENTS`` of the image with the repainted part blacked out (``image * (mask < 0.5)``) and
        ``LATENT_MASK`` ``[1, 1, h, w]`` (the mask resized to the latents, nearest, as ``prepare_mask_latents``).
        ``denoise`` samples from the distributions with the request's generator, in the pipelines' order.
        """
        from diffusers.image_processor import VaeImageProcessor
        from PIL import Image

        height, width = init_image.shape[:2]
        f = self.info.vae_scale_factor
        image = VaeImageProcessor(vae_scale_factor=f).preprocess(Image.fromarray(init_image), height, width)
        out = {"INIT_MOMENTS": self._moments(image)}
        if mask_image is not None:
            processor = VaeImageProcessor(vae_scale_factor=f, do_normalize=False, do_binarize=True,
                                          do_convert_grayscale=True)  # fmt: skip
            mask = processor.preprocess(Image.fromarray(mask_image), height, width)
            out["MASKED_MOMENTS"] = self._moments(image * (mask < 0.5))
            out["LATENT_MASK"] = torch.nn.functional.interpolate(mask, size=(height // f, width // f)).numpy()
        return out

    def _moments(self, image: torch.Tensor) -> np.ndarray:
        with self.cfg.compute():
            moments = self.model.encode(image.to(self.cfg.device, self.dtype)).latent_dist.parameters
        return moments.float().cpu().numpy()

    def handle(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Triton entry: ``LATENTS`` → ``IMAGES``; or ``INIT_IMAGE`` (``MASK_IMAGE``) → their latent distributions."""
        if "LATENTS" in tensors:
            return {"IMAGES": self.decode_all(tensors["LATENTS"])}
        if "INIT_IMAGE" not in tensors:
            raise InvalidRequestError("LATENTS", "is required (or INIT_IMAGE, to encode it)")
        request = parse_request(tensors, self.limits, only=VAE_ENCODE_INPUTS)
        if request.init_image is None:
            raise InvalidRequestError("INIT_IMAGE", "is required")
        return self.encode(request.init_image, request.mask_image)


def replacement_vae(info: ModelInfo, vae_dir: Path) -> ModelInfo:
    """The model's facts with the VAE of ``vae_dir`` (parameter ``vae_dir``: a diffusers ``AutoencoderKL``
    directory, e.g. SDXL's fp16-fix VAE), refused at load unless it decodes the same latent space as ``info``
    (channels, scale factor, scaling factor, ``latents_mean``/``latents_std``); its ``force_upcast`` applies.
    """
    try:
        theirs = ModelInfo.vae_facts(json.loads((vae_dir / "config.json").read_text()))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"vae_dir {vae_dir}: not a diffusers AutoencoderKL directory ({exc})") from None
    for key, other in theirs.items():
        mine = getattr(info, key)
        if key != "vae_force_upcast" and mine != other:
            raise ConfigError(
                f"vae_dir {vae_dir}: {key} {other} differs from the model's VAE ({mine}); a replacement VAE must "
                "decode the same latent space (e.g. SDXL's fp16-fix VAE for an SDXL model)"
            )
    return dataclasses.replace(info, vae_force_upcast=theirs["vae_force_upcast"])
