"""Single-file checkpoints (``.safetensors`` in the original Stable Diffusion layout, as A1111 and civitai ship them)
→ diffusers model directories, through diffusers' own single-file loaders, offline.

``swiftdiffusion convert CHECKPOINT --out DIR [--arch sd1|sdxl] [--config DIR]``; ``serve --model-dir
CHECKPOINT`` converts once into the cache. A single file holds weights only: the architecture's configs and
tokenizers come from ``--config``, a local diffusers directory of the same architecture (e.g. the model's own
diffusers release), or by default from the generated default model of the architecture (which fits checkpoints
written from generated models). Nothing is fetched from a hub (``local_files_only``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ConfigError
from ..paths import cache_dir, default_model_dir

#: Key prefixes that tell a checkpoint's architecture (the original layout's text encoders).
ARCH_KEYS = {
    "sdxl": "conditioner.embedders.1.model.",
    "sd1": "cond_stage_model.transformer.",
    "sd2": "cond_stage_model.model.",
}
#: Suffixes of a single-file checkpoint ``serve --model-dir`` accepts.
CHECKPOINT_SUFFIXES = (".safetensors",)


def detect_arch(checkpoint: Path) -> str | None:
    """``sd1``, ``sdxl`` or ``sd2`` from the checkpoint's keys (header only), or ``None``."""
    from safetensors import safe_open

    try:
        with safe_open(str(checkpoint), "pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # noqa: BLE001 - not a safetensors file
        raise ConfigError(f"{checkpoint}: not a readable .safetensors checkpoint ({exc})") from None
    for arch, prefix in ARCH_KEYS.items():
        if any(k.startswith(prefix) for k in keys):
            return arch
    return None


def convert_checkpoint(checkpoint: Path, out: Path, arch: str | None = None, config: Path | None = None) -> Path:
    """Write the diffusers directory of ``checkpoint`` to ``out`` (atomically); returns ``out``.

    ``arch`` (``sd1``/``sdxl``): what the checkpoint is, when its keys do not tell (then its detected kind, if any,
    is in the error). ``config``: the architecture's configs and tokenizers (default: the generated default model of
    ``arch``). A checkpoint that does not fit ``config`` is refused naming both.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    detected = detect_arch(checkpoint)
    arch = arch or detected
    if arch not in ("sd1", "sdxl"):
        seen = f"its keys look like {detected}" if detected else "its keys match no known layout"
        raise ConfigError(
            f"{checkpoint}: cannot tell its architecture ({seen}); pass --arch sd1 or --arch sdxl (SD1.x or SDXL "
            "checkpoints in the original layout)"
        )
    if config is None:
        from .default_model import write_default_model

        config = write_default_model(default_model_dir(arch), arch=arch)
    if not (config / "model_index.json").is_file():
        raise ConfigError(f"--config {config}: not a diffusers model directory (no model_index.json)")
    pipeline = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    extra = {"add_watermarker": False} if arch == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = pipeline.from_single_file(str(checkpoint), config=str(config), local_files_only=True, **extra)
    except Exception as exc:  # noqa: BLE001 - shapes or keys that do not fit the configs
        raise ConfigError(
            f"{checkpoint}: does not fit the {arch} architecture of {config} ({type(exc).__name__}: "
            f"{str(exc)[:300]}); pass --config a diffusers directory of the checkpoint's architecture"
        ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def converted_model_dir(checkpoint: Path, arch: str | None = None) -> Path:
    """``serve --model-dir CHECKPOINT``: the diffusers directory of ``checkpoint`` in the cache, converted the first
    time (keyed by the file's path, size and modification time, so a changed file is converted again).
    """
    stat = checkpoint.stat()
    key = hashlib.sha256(f"{checkpoint.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{arch}".encode()).hexdigest()
    out = cache_dir() / "converted" / f"{checkpoint.stem}-{key[:12]}"
    if (out / "model_index.json").is_file():
        return out
    return convert_checkpoint(checkpoint, out, arch)
