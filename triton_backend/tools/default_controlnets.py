"""ControlNets for the default model, in diffusers format (``ControlNetModel.from_pretrained`` loads them).

``ControlNetModel.from_unet`` copies the UNet encoder but initialises the zero convolutions (and the hint
embedding's last conv) to zero, so a fresh ControlNet changes nothing; here they get seeded random weights so each
ControlNet clearly changes the image (tested), and an equivalence test with it can fail.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: name → seed; each a differently initialised ControlNet.
DEFAULT_CONTROLNETS = {"edges": 21, "depth": 22}


def write_default_controlnets(model_dir: Path, embedding_channels: tuple[int, ...] = (8, 8, 16, 16)) -> list[Path]:
    """Write ``<model_dir>/controlnets/<name>/`` for every default ControlNet."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(model_dir / "unet"))
    out = []
    for name, seed in DEFAULT_CONTROLNETS.items():
        torch.manual_seed(seed)
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding_channels)
        latents = 4
        if cn.conv_in.in_channels != latents:  # an inpainting UNet's 9 channels: a ControlNet takes the 4 latents
            conv = cn.conv_in
            cn.conv_in = torch.nn.Conv2d(latents, conv.out_channels, conv.kernel_size, padding=conv.padding)
            with torch.no_grad():
                cn.conv_in.weight.copy_(conv.weight[:, :latents])
                cn.conv_in.bias.copy_(conv.bias)
            cn.register_to_config(in_channels=latents)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            zero_convs = [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]
            for conv in zero_convs:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (0.3 / conv.weight[0].numel() ** 0.5))
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.05)
        path = model_dir / "controlnets" / name
        cn.save_pretrained(str(path), safe_serialization=True)
        out.append(path)
    return out
