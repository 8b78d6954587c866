"""Where things live on disk: the model repository, the default model, the cache."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that ``swiftdiffusion serve`` sets to point every stage at the model directory.
MODEL_DIR_ENV = "SWIFTDIFFUSION_MODEL_DIR"


def cache_dir() -> Path:
    """``$SWIFTDIFFUSION_CACHE`` or ``$XDG_CACHE_HOME/swiftdiffusion`` (``~/.cache/swiftdiffusion``)."""
    if os.environ.get("SWIFTDIFFUSION_CACHE"):
        return Path(os.environ["SWIFTDIFFUSION_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "swiftdiffusion"


def default_model_dir() -> Path:
    """Where ``swiftdiffusion serve`` generates and finds the default model."""
    return cache_dir() / "models" / "default"


def model_repository_dir() -> Path:
    """The ``model_repository/`` shipped next to this package (source checkout or editable install)."""
    env = os.environ.get("SWIFTDIFFUSION_MODEL_REPOSITORY")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "model_repository"


def baseline_repository_dir() -> Path:
    """``baseline_repository/``: the stock-diffusers ``txt2img`` used as the benchmark baseline."""
    return Path(__file__).resolve().parent.parent / "baseline_repository"
