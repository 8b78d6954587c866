"""Cheap previews of a generation in progress: a fixed linear map from the current latents to RGB, per architecture.

This is what popular UIs show between steps (A1111's "Approx cheap", ComfyUI's latent2rgb): no VAE, one
``[C] x [3]`` matrix per latent pixel, so a preview costs microseconds and has the latent's resolution (1/8 of the
image's side). The factors are the published approximations for SD 1.x/2.x and SDXL latents; they are only
approximate (colours and layout, not detail), which is all a progress preview needs.
"""

from __future__ import annotations

import numpy as np
import torch

from ..model_info import ModelInfo

#: ``latent channel → (R, G, B)`` and a bias, as the UIs use them.
SD_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
SD_BIAS = (0.0, 0.0, 0.0)
SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_BIAS = (0.1084, -0.0175, -0.0011)


def latent_rgb(latents: torch.Tensor, info: ModelInfo) -> np.ndarray:
    """``[1, C, h, w]`` latents → ``[h, w, 3]`` uint8. Other channel counts than 4: the first three channels,
    each scaled to its own range (still a fair picture of where the image is going).
    """
    x = latents[0].float().permute(1, 2, 0)  # [h, w, C]
    if x.shape[-1] == 4:
        factors, bias = (SDXL_FACTORS, SDXL_BIAS) if info.is_sdxl else (SD_FACTORS, SD_BIAS)
        rgb = x @ torch.tensor(factors) + torch.tensor(bias)
    else:
        rgb = x[..., :3]
        low, high = rgb.amin(dim=(0, 1)), rgb.amax(dim=(0, 1))
        rgb = (rgb - low) / (high - low).clamp(min=1e-6) * 2 - 1
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
