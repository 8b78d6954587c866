"""Where things live on disk: the model repository, the default model, the cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

#: Names servable from an adapter store (LoRA files, ControlNet directories): no separators, no leading dot.
_STORE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def is_store_name(name: str) -> bool:
    """Whether ``name`` can name an adapter in a store (it cannot leave the store directory)."""
    return bool(_STORE_NAME.match(name))


def lora_dir(params: dict[str, str], model_dir: Path) -> Path:
    """The LoRA store: config parameter ``lora_dir``, default ``<model_dir>/loras``."""
    return Path(params.get("lora_dir") or model_dir / "loras")


def embedding_dir(params: dict[str, str], model_dir: Path) -> Path:
    """The textual-inversion embedding store: config parameter ``embedding_dir``, default ``<model_dir>/embeddings``."""
    return Path(params.get("embedding_dir") or model_dir / "embeddings")


def controlnet_dir(params: dict[str, str], model_dir: Path) -> Path:
    """The ControlNet store: config parameter ``controlnet_dir``, default ``<model_dir>/controlnets``."""
    return Path(params.get("controlnet_dir") or model_dir / "controlnets")


#: Environment variable that ``swiftdiffusion serve`` sets to point every stage at the model directory.
MODEL_DIR_ENV = "SWIFTDIFFUSION_MODEL_DIR"


def cache_dir() -> Path:
    """``$SWIFTDIFFUSION_CACHE`` or ``$XDG_CACHE_HOME/swiftdiffusion`` (``~/.cache/swiftdiffusion``)."""
    if os.environ.get("SWIFTDIFFUSION_CACHE"):
        return Path(os.environ["SWIFTDIFFUSION_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "swiftdiffusion"


def default_model_dir(arch: str = "sd1", preset: str = "tiny", inpainting: bool = False) -> Path:
    """Where the generated default model of ``arch``/``preset`` lives (``serve`` uses the tiny ones):
    ``models/default`` (SD1 tiny), ``models/default-sdxl`` (SDXL tiny), ``models/<preset>`` and
    ``models/sdxl-<preset>`` for the benchmark presets; ``-inpainting`` after the name for an inpainting UNet.
    """
    if preset == "tiny":
        name = "default-sdxl" if arch == "sdxl" else "default"
    else:
        name = f"sdxl-{preset}" if arch == "sdxl" else preset
    return cache_dir() / "models" / (name + ("-inpainting" if inpainting else ""))


def _shipped(name: str) -> Path:
    """A repository of templates: next to the package in a source checkout (editable install), else the copy
    installed inside it as package data (a wheel).
    """
    here = Path(__file__).resolve().parent
    checkout = here.parent / name
    return checkout if (checkout / "txt2img" / "config.pbtxt").is_file() else here / name


def model_repository_dir() -> Path:
    """The model repository templates: ``$SWIFTDIFFUSION_MODEL_REPOSITORY``, else ``model_repository/``."""
    env = os.environ.get("SWIFTDIFFUSION_MODEL_REPOSITORY")
    if env:
        return Path(env)
    return _shipped("model_repository")


def baseline_repository_dir() -> Path:
    """``baseline_repository/``: the stock-diffusers ``txt2img`` used as the benchmark baseline."""
    return _shipped("baseline_repository")
