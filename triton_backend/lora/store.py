"""The LoRA store (a directory of ``.safetensors`` files) and the host-memory cache of converted adapters.

A file copied into the store is servable by its file name without ``.safetensors`` at once (the directory is read
per request); a changed file gets a new cache key (size, mtime, inode), so it is never served stale. Converted
factors are written as safetensors files under a shared-memory directory that the UNet and text-encoder
processes map (``safetensors.load_file``): weights never travel in per-step request tensors. The cache has a byte
budget with LRU eviction.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InvalidRequestError, NotFoundError
from ..paths import is_store_name
from ..shm import STAGE_DIR_PREFIXES, save_tensors, stage_dir
from .convert import file_signature

#: Directory-name prefix of converted-adapter caches (the UNet maps only files under such a directory).
CACHE_DIR_PREFIX = STAGE_DIR_PREFIXES[0]
#: Key prefixes of text-encoder layers in the formats diffusers reads (PEFT/diffusers, kohya/A1111).
_TE_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_", "te.", "te1.", "te2.")


def has_text_encoder_layers(path: Path, field: str = "LORA_NAMES") -> bool:
    """Read only the safetensors header: does this LoRA touch the text encoder? A corrupt file is invalid."""
    try:
        with safe_open(str(path), "pt") as f:
            return any(k.startswith(_TE_PREFIXES) for k in f.keys())  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt headers raise various errors
        raise InvalidRequestError(field, f"{path.stem}: not a readable safetensors LoRA ({exc})") from None


def lora_names(root: Path) -> list[str]:
    """Every servable LoRA name in ``root`` (file stems), read from the directory now."""
    if not root.is_dir():
        return []
    return sorted(p.stem for p in root.glob("*.safetensors") if p.is_file())


def resolve_lora_path(root: Path, name: str, field: str = "LORA_NAMES") -> Path:
    """The file of ``name``; an invalid or unknown name raises naming ``field`` (and listing what exists)."""
    if not is_store_name(name):
        raise InvalidRequestError(field, f"{name!r} is not a valid LoRA name (letters, digits, _ . + -)")
    path = root / f"{name}.safetensors"
    if not path.is_file():
        raise NotFoundError(field, name, lora_names(root))
    if not path.resolve().is_relative_to(root.resolve()):
        raise InvalidRequestError(field, f"{name}: the file links outside the LoRA store")
    return path


@dataclass
class CacheEntry:
    name: str
    signature: str
    file: Path
    nbytes: int
    has_text_encoder: bool


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    load_seconds: float = 0.0
    bytes_resident: int = 0
    evictions: int = 0


@dataclass
class LoraStore:
    """Resolve names in ``root``; convert on a miss with ``convert(path) -> factors``; LRU within ``budget_bytes``."""

    root: Path
    convert: Callable[[Path], dict[str, torch.Tensor]]
    budget_bytes: int = 1 << 30
    cache_root: Path | None = None
    stats: CacheStats = field(default_factory=CacheStats)
    #: EMULATION of network storage for benchmarks: each miss waits latency + size / bandwidth (0 = off).
    emulate_latency_s: float = 0.0
    emulate_bandwidth_bps: float = 0.0

    def __post_init__(self) -> None:
        #: Where converted factor files are written (``cache_root``, else a fresh shared-memory directory whose
        #: lock this process holds until :meth:`close`, so a crash leaves it to :func:`~triton_backend.shm.sweep`).
        self._owner_fd: int | None = None
        if self.cache_root is not None:
            self.cache_dir = Path(self.cache_root)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.cache_dir, self._owner_fd = stage_dir(CACHE_DIR_PREFIX)
        self._entries: OrderedDict[tuple[str, str], CacheEntry] = OrderedDict()
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return lora_names(self.root)

    def get(self, name: str) -> CacheEntry:
        """The converted adapter for ``name``: from the cache, or converted now (a miss)."""
        path = resolve_lora_path(self.root, name)
        try:
            signature = file_signature(path)
        except FileNotFoundError:
            raise NotFoundError("LORA_NAMES", name, self.names()) from None
        key = (name, signature)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.file.is_file():
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return entry
            self.stats.misses += 1
            start = time.perf_counter()
            self._emulate_slow_storage(path)
            factors = self.convert(path)
            try:
                changed = file_signature(path) != signature
            except FileNotFoundError:
                changed = True
            if changed:  # what was read may be half old, half new: never cache or serve it
                raise InvalidRequestError(
                    "LORA_NAMES", f"{name}: the file changed or was removed while it was loaded; send the request again"
                )
            file = self.cache_dir / f"{name}-{signature}.safetensors"
            save_tensors(factors, file, "lora_manager", "free shared memory or lower its parameter cache_budget_mb")
            entry = CacheEntry(name, signature, file, file.stat().st_size, has_text_encoder_layers(path))
            self._drop_stale(name, signature)
            self._entries[key] = entry
            self.stats.bytes_resident += entry.nbytes
            self.stats.load_seconds += time.perf_counter() - start
            self._evict()
            return entry

    def _emulate_slow_storage(self, path: Path) -> None:
        """Benchmark-only emulation of remote storage (clearly not real I/O): sleep latency + size/bandwidth."""
        delay = self.emulate_latency_s
        if self.emulate_bandwidth_bps > 0:
            delay += path.stat().st_size / self.emulate_bandwidth_bps
        if delay > 0:
            time.sleep(delay)

    def _drop_stale(self, name: str, signature: str) -> None:
        for key in [k for k in self._entries if k[0] == name and k[1] != signature]:
            self._remove(key)

    def _evict(self) -> None:
        # Keep the newest entry even if it alone exceeds the budget (it is being served).
        while self.stats.bytes_resident > self.budget_bytes and len(self._entries) > 1:
            self._remove(next(iter(self._entries)))
            self.stats.evictions += 1

    def _remove(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key)
        self.stats.bytes_resident -= entry.nbytes
        entry.file.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove every converted file (called when the manager unloads)."""
        with self._lock:
            self._entries.clear()
            self.stats.bytes_resident = 0
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            if self._owner_fd is not None:
                os.close(self._owner_fd)
                self._owner_fd = None
