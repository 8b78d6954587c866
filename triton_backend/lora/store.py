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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..cache import ByteLRU, LRUStats
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


class LoraStore:
    """Resolve names in ``root``; convert on a miss with ``convert(path) -> factors``; LRU within ``budget_bytes``.

    The converted files are an LRU (:class:`~triton_backend.cache.ByteLRU`) that always keeps its newest entry, even
    when that alone exceeds the budget (it is being served). Parameter ``lora_store`` of ``lora_manager`` names a
    subclass to use instead (:func:`~triton_backend.lora.manager.make_store`), constructed with these arguments; it
    may override :meth:`load` (one miss) and :meth:`get_many` (one request), e.g. for remote storage.
    """

    def __init__(
        self,
        root: Path,
        convert: Callable[[Path], dict[str, torch.Tensor]],
        budget_bytes: int = 1 << 30,
        cache_root: Path | None = None,
    ):
        self.root = root
        self.convert = convert
        self.cache_root = cache_root
        #: Converted adapters by (name, file signature); ``stats`` are its counters (the stage's metrics).
        self.cache: ByteLRU[CacheEntry] = ByteLRU(
            budget_bytes, size=lambda e: e.nbytes, on_evict=lambda e: e.file.unlink(missing_ok=True), keep_newest=True
        )
        #: Where converted factor files are written (``cache_root``, else a fresh shared-memory directory whose
        #: lock this process holds until :meth:`close`, so a crash leaves it to :func:`~triton_backend.shm.sweep`).
        self._owner_fd: int | None = None
        if cache_root is not None:
            self.cache_dir = Path(cache_root)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.cache_dir, self._owner_fd = stage_dir(CACHE_DIR_PREFIX)
        self._lock = threading.Lock()

    @property
    def stats(self) -> LRUStats:
        return self.cache.stats

    @property
    def budget_bytes(self) -> int:
        return self.cache.budget_bytes

    @budget_bytes.setter
    def budget_bytes(self, value: int) -> None:
        self.cache.budget_bytes = value

    def names(self) -> list[str]:
        return lora_names(self.root)

    def get_many(self, names: Sequence[str]) -> list[CacheEntry]:
        """The adapters of one request's ``names``, in order (:meth:`get` each; the manager calls this once per
        request, so a store on remote storage can fetch a request's files together).
        """
        return [self.get(name) for name in names]

    def get(self, name: str) -> CacheEntry:
        """The converted adapter for ``name``: from the cache, or converted now (a miss)."""
        path = resolve_lora_path(self.root, name)
        try:
            signature = file_signature(path)
        except FileNotFoundError:
            raise NotFoundError("LORA_NAMES", name, self.names()) from None
        key = (name, signature)
        with self._lock:
            entry = self.cache.get(key, valid=lambda e: e.file.is_file())
            if entry is not None:
                return entry
            self.cache.pop(key)  # its file is gone (a sweep): forget it before a file of that name is written again
            start = time.perf_counter()
            factors = self.load(path)
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
            for stale, kept in self.cache.items():  # an older version of the file: never served again
                if kept.name == name and kept.signature != signature:
                    self.cache.pop(stale)
            self.stats.loads += 1
            self.stats.load_seconds += time.perf_counter() - start
            self.cache.put(key, entry)
            return entry

    def load(self, path: Path) -> dict[str, torch.Tensor]:
        """Read and convert the file at ``path`` (a cache miss; under the store's lock, counted in ``load_seconds``).
        A store on slower or remote storage overrides this (e.g. to fetch the file first).
        """
        return self.convert(path)

    def close(self) -> None:
        """Remove every converted file (called when the manager unloads)."""
        with self._lock:
            self.cache.clear()
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            if self._owner_fd is not None:
                os.close(self._owner_fd)
                self._owner_fd = None
