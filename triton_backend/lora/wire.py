"""The LoRA wire format, one place for sender and receiver.

* ``text_encoder``/``denoise`` → ``lora_manager``: ``LORA_NAMES [m]`` → ``LORA_FILES [m]`` (converted factor files);
* ``denoise`` → ``unet``: the request's LoRA set as ``ADAPTERS [b, 1]``, one :class:`AdapterRef` each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import InvalidRequestError
from ..schema import decode_json_rows, encode_json_rows
from .patch import AdapterRef
from .store import CACHE_DIR_PREFIX


def names_tensor(loras: Sequence[tuple[str, float]]) -> np.ndarray:
    """``LORA_NAMES [m]`` of a ``lora_manager`` request for ``[(name, scale)]``."""
    return np.array([n.encode() for n, _ in loras], dtype=np.object_)


def adapter_refs(loras: Sequence[tuple[str, float]], outputs: Mapping[str, np.ndarray]) -> list[AdapterRef]:
    """``[(name, scale)]`` and the ``lora_manager``'s ``LORA_FILES`` → one :class:`AdapterRef` per LoRA."""
    files = [bytes(f).decode() for f in outputs["LORA_FILES"].reshape(-1)]
    return [AdapterRef(n, f, s) for (n, s), f in zip(loras, files, strict=True)]


def encode_adapters(adapters: tuple[AdapterRef, ...], rows: int) -> np.ndarray:
    """``ADAPTERS [rows, 1]``: the request's LoRA set."""
    return encode_json_rows([(a.name, a.file, a.scale) for a in adapters], rows)


def decode_adapters(value: np.ndarray) -> tuple[AdapterRef, ...]:
    """``ADAPTERS`` → ``AdapterRef``s; only converted files written by a lora_manager are ever mapped."""
    refs = tuple(AdapterRef(*t) for t in decode_json_rows(value, "ADAPTERS"))
    for ref in refs:
        path = Path(ref.file)
        if path.suffix != ".safetensors" or not path.parent.name.startswith(CACHE_DIR_PREFIX):
            raise InvalidRequestError("ADAPTERS", f"{ref.name}: {ref.file} is not a lora_manager cache file")
    return refs
