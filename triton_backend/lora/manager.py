"""Stage ``lora_manager``: names → converted adapters (files the UNet/text-encoder processes map).

Runs as its own Triton model, so conversion (the load-heavy part: storage → host memory → per-layer factors) runs
while ``denoise`` is already stepping without the LoRAs (bounded asynchronous loading).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import StageConfig
from ..errors import ConfigError
from ..parameters import mib
from ..paths import lora_dir
from ..schema import parse_names
from .convert import convert_lora_file, load_skeletons
from .store import LoraStore


class LoraManager:
    """Owns the store and the conversion skeletons (the UNet and text encoder(s) of the served model)."""

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg
        #: Conversion skeletons by diffusers component name.
        self.components = load_skeletons(cfg)
        self.store = make_store(cfg, self._convert)

    def _convert(self, path: Path) -> dict[str, torch.Tensor]:
        with self.cfg.compute():
            return convert_lora_file(path, self.components)

    def handle(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``LORA_NAMES [m]`` → ``LORA_FILES [m]`` (BYTES paths) and ``LORA_TEXT_ENCODER [m]`` (BOOL)."""
        entries = self.store.get_many(parse_names(tensors, "LORA_NAMES"))
        return {
            "LORA_FILES": np.array([str(e.file).encode() for e in entries], dtype=np.object_),
            "LORA_TEXT_ENCODER": np.array([e.has_text_encoder for e in entries], dtype=bool),
        }

    def close(self) -> None:
        self.store.close()


def make_store(cfg: StageConfig, convert: Callable[[Path], dict[str, torch.Tensor]]) -> LoraStore:
    """The stage's store, from its parameters (the ones the manager itself reads are all read here): ``lora_dir``,
    ``cache_budget_mb``, and ``lora_store``: the store class as ``module:Class`` (empty = :class:`LoraStore`), a
    subclass of :class:`LoraStore` importable in the stage's process, constructed with the same arguments
    (``root``, ``convert``, ``budget_bytes``). Options may follow as ``module:Class?key=value&key=value``; they are
    passed to the constructor as keyword arguments, as strings (e.g. a remote store's bucket). A value that does not
    name such a class, or options it does not take, fail the load naming the parameter.
    """
    name, params = cfg.model_name, cfg.params
    root = lora_dir(params, cfg.model_dir)
    budget_bytes = mib(params["cache_budget_mb"])
    spec = params["lora_store"]
    if not spec:
        return LoraStore(root, convert, budget_bytes)
    store_class, options = load_store_class(name, spec)
    try:
        return store_class(root=root, convert=convert, budget_bytes=budget_bytes, **options)
    except (TypeError, ValueError) as exc:  # an option it does not take, or a value it cannot read
        raise ConfigError(f"{name}: parameter lora_store={spec!r}: {type(exc).__name__}: {exc}") from None


def load_store_class(model: str, spec: str) -> tuple[type[LoraStore], dict[str, Any]]:
    """``module:Class?key=value&...`` (parameter ``lora_store``) → the class and its options."""
    path, _, query = spec.partition("?")
    module_name, colon, class_name = path.partition(":")

    def invalid(reason: str) -> ConfigError:
        return ConfigError(f"{model}: parameter lora_store={spec!r} {reason}")

    if not (colon and module_name and class_name):
        raise invalid("is not module:Class (a LoraStore subclass, e.g. mypackage.stores:RemoteLoraStore)")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - importing runs the module's own code: any error fails the load
        raise invalid(f"cannot be imported ({type(exc).__name__}: {exc})") from None
    store_class = getattr(module, class_name, None)
    if not (isinstance(store_class, type) and issubclass(store_class, LoraStore)):
        raise invalid(f"does not name a subclass of {LoraStore.__module__}.LoraStore")
    options: dict[str, Any] = {}  # (strings: the class reads them)
    for option in query.split("&") if query else []:
        key, eq, value = option.partition("=")
        if not (eq and key.isidentifier()):
            raise invalid(f"has option {option!r}; options are key=value, joined by &")
        options[key] = value
    return store_class, options
