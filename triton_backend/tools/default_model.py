"""Generate the small, deterministic, random-weight default models (diffusers format).

No model hub is reachable where SwiftDiffusion is built and tested, so the default models are written locally:

* ``arch="sd1"``: a Stable-Diffusion-1.x-architecture pipeline (``UNet2DConditionModel``, ``AutoencoderKL``,
  ``CLIPTextModel``, a ``CLIPTokenizer`` whose vocabulary and merges are built here, a scheduler config) that
  ``StableDiffusionPipeline.from_pretrained(DIR)`` loads;
* ``arch="sdxl"``: an SDXL-architecture pipeline (two tokenizers, ``CLIPTextModel`` + ``CLIPTextModelWithProjection``,
  a UNet with ``addition_embed_type="text_time"``) that ``StableDiffusionXLPipeline.from_pretrained(DIR)`` loads;

each plus LoRAs (``DIR/loras``) and ControlNets (``DIR/controlnets``) for it. It is sized
so a 4-step 64x64 request takes well under a second on a laptop CPU, and its weights are scaled up from the
default init so that prompt, seed and scheduler visibly change the image (a near-constant gray image would
make every equivalence test pass).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

#: Bump when the generated weights change, so a stale cached default model is regenerated.
DEFAULT_MODEL_VERSION = "3"
#: Architectures ``write_default_model`` can generate, and the presets each has.
ARCHS = ("sd1", "sdxl")
_MARKER = "swiftdiffusion_default_model.json"

# Words that get whole-word BPE merges; everything else falls back to byte-level characters.
_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "with",
    "in",
    "on",
    "at",
    "photo",
    "painting",
    "portrait",
    "cat",
    "dog",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "house",
    "tree",
    "mountain",
    "river",
    "city",
    "night",
    "day",
    "sky",
    "sun",
    "moon",
    "astronaut",
    "horse",
    "riding",
    "forest",
    "ocean",
    "beach",
    "car",
    "street",
    "flower",
    "garden",
    "old",
    "young",
    "man",
    "woman",
    "robot",
    "castle",
    "snow",
    "rain",
    "fire",
    "water",
    "light",
    "dark",
    "bright",
    "blurry",
    "lowres",
    "ugly",
    "bad",
    "quality",
    "best",
    "detailed",
    "landscape",
    "oil",
    "sketch",
    "watercolor",
    "cinematic",
    "style",
    "art",
]


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-unicode table (the base alphabet of its byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def build_tokenizer_files(out: Path) -> int:
    """Write ``vocab.json`` and ``merges.txt`` for a small CLIP BPE; returns the vocabulary size."""
    base = list(_bytes_to_unicode().values())
    vocab: list[str] = base + [c + "</w>" for c in base]
    merges: list[str] = []
    seen = set(vocab)
    for word in _WORDS:
        symbols = [*word[:-1], word[-1] + "</w>"]
        current = symbols[0]
        for nxt in symbols[1:]:
            merged = current + nxt
            rule = f"{current} {nxt}"
            if merged not in seen:
                merges.append(rule)
                vocab.append(merged)
                seen.add(merged)
            current = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def _scale_weights(module: torch.nn.Module, factor: float) -> None:
    """Scale every conv/linear weight so random features do not collapse to a flat gray image."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (torch.nn.Conv2d, torch.nn.Linear)):
                sub.weight.mul_(factor)


#: Model presets: ``tiny`` (tests: a 4-step 64x64 request in well under a second), ``cpu`` (CPU benchmarks: big
#: enough that adapter costs show), ``sd15`` (the full SD1.5 architecture, random weights, for GPU benchmarks).
PRESETS: dict[str, dict] = {
    "tiny": {
        "unet": dict(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8,
            norm_num_groups=16,
        ),
        "vae": dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        "scale": (1.5, 1.3),
        "controlnet_embedding": (8, 8, 16, 16),
    },
    "cpu": {
        "unet": dict(
            sample_size=16,
            block_out_channels=(64, 128, 128),
            layers_per_block=2,
            cross_attention_dim=64,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        "vae": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=16, sample_size=128),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
        "scale": (1.3, 1.2),
        "controlnet_embedding": (16, 16, 32, 32),
    },
    "sd15": {
        "unet": dict(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        "scale": (1.0, 1.0),
        "controlnet_embedding": (16, 32, 96, 256),
    },
}


#: SDXL presets: ``tiny`` (tests), ``cpu`` (CPU benchmarks). The UNet has SDXL's ``text_time`` added
#: conditioning (pooled text embedding + 6 time ids), a CrossAttn block with 2 transformer layers, linear
#: projections and per-block head dims; the two text encoders differ (sizes, seeds, and the second tokenizer
#: pads with ``!`` as SDXL's does).
SDXL_PRESETS: dict[str, dict] = {
    "tiny": {
        "unet": dict(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            norm_num_groups=16,
        ),
        "vae": dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        "text_2": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4),
        "projection_dim": 24,
        "scale": (1.5, 1.3),
        "controlnet_embedding": (8, 8, 16, 16),
    },
    "cpu": {
        "unet": dict(
            sample_size=16,
            block_out_channels=(64, 128, 128),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=16,
            transformer_layers_per_block=(1, 1, 2),
            norm_num_groups=32,
        ),
        "vae": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=16, sample_size=128),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
        "text_2": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4),
        "projection_dim": 64,
        "scale": (1.3, 1.2),
        "controlnet_embedding": (16, 16, 32, 32),
    },
}


def presets(arch: str) -> dict[str, dict]:
    """The preset table of ``arch``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    return SDXL_PRESETS if arch == "sdxl" else PRESETS


def _text_config(vocab_size: int, text: dict, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        **text,
    )


def _vae(p: dict, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        **p["vae"],
        **extra,
    )
    _scale_weights(vae.decoder, p["scale"][1])
    return vae


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )


def build_sdxl_components(vocab_size: int, preset: str = "tiny", unet_in_channels: int = 4) -> dict:
    """SDXL modules, deterministic: ``cross_attention_dim`` = hidden(te1) + hidden(te2), and the added embedding
    takes ``6 * addition_time_embed_dim + projection_dim`` (as ``StableDiffusionXLPipeline._get_add_time_ids`` checks).
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    p = SDXL_PRESETS[preset]
    unet_cfg = dict(p["unet"])
    unet_cfg["cross_attention_dim"] = p["text"]["hidden_size"] + p["text_2"]["hidden_size"]
    unet_cfg["projection_class_embeddings_input_dim"] = 6 * unet_cfg["addition_time_embed_dim"] + p["projection_dim"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=unet_in_channels, out_channels=4, **unet_cfg)
    _scale_weights(unet, p["scale"][0])
    vae = _vae(p, scaling_factor=0.13025, force_upcast=True)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_text_config(vocab_size, p["text"], p["text"]["hidden_size"]))
    torch.manual_seed(3)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, p["text_2"], p["projection_dim"]))
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "scheduler": _scheduler(),
    }


def build_components(vocab_size: int, preset: str = "tiny", unet_in_channels: int = 4) -> dict:
    """Build the random-weight modules deterministically (fixed seeds, CPU, float32); ``unet_in_channels=9``: an
    inpainting UNet (latents, mask, masked image latents).
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    p = PRESETS[preset]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=unet_in_channels, out_channels=4, **p["unet"])
    _scale_weights(unet, p["scale"][0])
    vae = _vae(p)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_text_config(vocab_size, p["text"], p["text"]["hidden_size"]))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": _scheduler()}


def write_default_model(
    out: str | os.PathLike,
    force: bool = False,
    preset: str = "tiny",
    arch: str = "sd1",
    dtype: str = "float32",
    inpainting: bool = False,
) -> Path:
    """Write the default model of ``arch`` to ``out`` (atomically: a temp dir renamed into place); return its path.

    Skips the work when ``out`` already holds this version, architecture, preset and dtype, unless ``force``.
    ``dtype="float16"`` halves the pipeline's weights on disk (the device check writes the full-size ``sd15`` preset
    on the device itself); its LoRAs and ControlNets stay float32. ``inpainting``: a 9-channel inpainting UNet
    (``img2img`` with ``MASK_IMAGE``, as ``StableDiffusion(XL)InpaintPipeline``), its ControlNets on the 4 latent
    channels (as the ControlNet inpaint pipelines feed them).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    table = presets(arch)
    if preset not in table:
        raise ValueError(f"unknown {arch} preset {preset!r}; choose from {', '.join(table)}")
    out = Path(out)
    if not force and is_current_default_model(out, preset, arch, dtype, inpainting):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".default-model-", dir=out.parent))
    try:
        tok_dir = tmp / "_tok"
        vocab_size = build_tokenizer_files(tok_dir)
        tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
        if arch == "sdxl":
            tokenizer_2 = CLIPTokenizer(
                str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77, pad_token="!"
            )
            pipe = StableDiffusionXLPipeline(
                **build_sdxl_components(vocab_size, preset, 9 if inpainting else 4),
                tokenizer=tokenizer,
                tokenizer_2=tokenizer_2,
                force_zeros_for_empty_prompt=True,
                add_watermarker=False,
            )
        else:
            pipe = StableDiffusionPipeline(
                **build_components(vocab_size, preset, 9 if inpainting else 4),
                tokenizer=tokenizer,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        pipe.to(dtype=getattr(torch, dtype))
        pipe.save_pretrained(tmp / "model", safe_serialization=True)
        shutil.rmtree(tok_dir)
        from .default_loras import write_default_loras

        write_default_loras(tmp / "model", arch)
        from .default_controlnets import write_default_controlnets

        write_default_controlnets(tmp / "model", table[preset]["controlnet_embedding"])
        marker = {"version": DEFAULT_MODEL_VERSION, "arch": arch, "preset": preset, "dtype": dtype}
        (tmp / "model" / _MARKER).write_text(json.dumps(marker | ({"inpainting": True} if inpainting else {})))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp / "model", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_current_default_model(
    path: Path, preset: str = "tiny", arch: str = "sd1", dtype: str = "float32", inpainting: bool = False
) -> bool:
    """True when ``path`` holds a complete default model of the current version, ``arch``, ``preset``, dtype and
    UNet kind.
    """
    try:
        marker = json.loads((Path(path) / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("version") == DEFAULT_MODEL_VERSION
        and marker.get("preset", "tiny") == preset
        and marker.get("arch", "sd1") == arch
        and marker.get("dtype", "float32") == dtype
        and marker.get("inpainting", False) == inpainting
    )
