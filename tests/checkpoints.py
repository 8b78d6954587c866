"""A generated SD1 model written as a single-file checkpoint in the original (LDM) layout, the inverse of diffusers'
``convert_ldm_*_checkpoint`` for any block count and ``layers_per_block`` (diffusers' own
``scripts/convert_diffusers_to_original_stable_diffusion.py`` assumes SD1.5's blocks): what ``convert`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file


def unet_map(cfg):
    L = cfg["layers_per_block"]
    down = cfg["down_block_types"]
    up = cfg["up_block_types"]
    n = len(down)
    m = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ]
    for i in range(n):
        for j in range(L):
            idx = 1 + i * (L + 1) + j
            m.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0."))
            if down[i].startswith("CrossAttn"):
                m.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1."))
        if i < n - 1:
            m.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (L + 1)}.0.op."))
    for i in range(n):
        for j in range(L + 1):
            idx = i * (L + 1) + j
            m.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0."))
            if up[i].startswith("CrossAttn"):
                m.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1."))
        if i < n - 1:
            pos = 2 if up[i].startswith("CrossAttn") else 1
            m.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (L + 1) + L}.{pos}."))
    m += [
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    return m


#: The renames inside a UNet resnet (diffusers → original).
RES = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
]
#: The renames inside the VAE's mid-block attention; its projections are 1x1 convolutions in the original layout.
VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
#: A block (diffusers prefix, original prefix) and the renames of its parts.
Block = tuple[str, str, list[tuple[str, str]]]


def rename(key: str, blocks: list[Block]) -> tuple[str, str | None]:
    """``key`` with its first matching block prefix renamed and, inside it, its first matching part prefix; and
    that part's diffusers name (``None``: no part matched).
    """
    for a, b, parts in blocks:
        if key.startswith(a):
            rest = key[len(a) :]
            for x, y in parts:
                if rest.startswith(x):
                    return b + y + rest[len(x) :], x
            return b + rest, None
    return key, None


def convert_unet(sd, cfg):
    blocks = [(a, b, RES if ".resnets." in a else []) for a, b in unet_map(cfg)]
    return {"model.diffusion_model." + rename(k, blocks)[0]: v for k, v in sd.items()}


def convert_vae(sd, cfg):
    n = len(cfg["block_out_channels"])
    L = cfg["layers_per_block"]
    shortcut = [("conv_shortcut.", "nin_shortcut.")]
    blocks: list[Block] = [
        ("encoder.conv_norm_out.", "encoder.norm_out.", []),
        ("decoder.conv_norm_out.", "decoder.norm_out.", []),
    ]
    for i in range(n):
        for j in range(L):
            blocks.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", shortcut))
        if i < n - 1:
            blocks.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", []))
        for j in range(L + 1):
            blocks.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", shortcut))
        if i < n - 1:
            blocks.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.", []))
    for part in ("encoder", "decoder"):
        blocks += [
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", shortcut),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", shortcut),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTN),
        ]
    out = {}
    for k, v in sd.items():
        new, part = rename(k, blocks)
        if part in ("to_q.", "to_k.", "to_v.", "to_out.0.") and new.endswith("weight"):
            v = v.reshape(*v.shape, 1, 1)
        out["first_stage_model." + new] = v
    return out


def write_original_checkpoint(model_dir: Path, out: Path) -> Path:
    unet_cfg = json.loads((model_dir / "unet/config.json").read_text())
    vae_cfg = json.loads((model_dir / "vae/config.json").read_text())
    sd = {}
    sd |= convert_unet(load_file(str(model_dir / "unet/diffusion_pytorch_model.safetensors")), unet_cfg)
    sd |= convert_vae(load_file(str(model_dir / "vae/diffusion_pytorch_model.safetensors")), vae_cfg)
    te = load_file(str(model_dir / "text_encoder/model.safetensors"))
    sd |= {
        "cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in te.items()
    }
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out))
    return out
