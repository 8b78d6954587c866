"""Textual-inversion embeddings: the store beside ``loras/`` and ``controlnets/``, as A1111 and diffusers read them.

A file's stem is the word that triggers it in a prompt (A1111's rule): ``<model_dir>/embeddings/easynegative.pt``
is used wherever a prompt says ``easynegative``. The store is read again at every request (one directory listing
and a ``stat`` per file), so a file added, changed or removed while the server runs is seen by the next request;
a file is parsed once per version (its size and modification time). Formats:

* A1111 ``.pt`` / ``.bin``: ``{"string_to_param": {"*": [n, D]}, ...}`` (read with ``torch.load(weights_only=True)``);
* A1111 ``.safetensors``: ``emb_params`` ``[n, D]``;
* SDXL: ``clip_l`` ``[n, 768]`` and ``clip_g`` ``[n, 1280]`` (one per text encoder, in that order);
* diffusers (``learned_embeds``): one tensor ``[D]`` or ``[n, D]`` under any single key (the token it was
  trained as).

Each vector set must fit its text encoder's width, or the request naming the embedding is refused by name.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InvalidRequestError
from .paths import is_store_name

#: File suffixes of the store.
SUFFIXES = (".safetensors", ".pt", ".bin")
#: The most vectors an embedding may have: one 75-token prompt chunk.
MAX_VECTORS = 75
#: SDXL's keys, one per text encoder in order.
SDXL_KEYS = ("clip_l", "clip_g")


@dataclass(frozen=True)
class Embedding:
    """One embedding: its trigger word and its vectors per text encoder (``[n, D_i]`` float32)."""

    name: str
    vectors: tuple[torch.Tensor, ...]
    #: (size, modification and change times in ns, inode) of the file it was read from.
    version: tuple[int, ...]
    #: Why the file cannot serve this model (then it has no vectors): a prompt that uses it is refused with this.
    error: str | None = None

    @property
    def count(self) -> int:
        return int(self.vectors[0].shape[0])

    def check(self, field: str) -> None:
        """Refuse (naming ``field``) a prompt that triggers this embedding when its file cannot serve the model."""
        if self.error is not None:
            raise InvalidRequestError(field, self.error)


def read_vectors(path: Path) -> list[torch.Tensor]:
    """The vector sets of an embedding file (one per text encoder for SDXL files), float32 ``[n, D]``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        data: dict = load_file(str(path))
    else:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError("not a dictionary of tensors")
    if all(key in data for key in SDXL_KEYS):
        tensors = [data[key] for key in SDXL_KEYS]
    elif "string_to_param" in data:
        tensors = [next(iter(data["string_to_param"].values()))]
    elif "emb_params" in data:
        tensors = [data["emb_params"]]
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        tensors = [next(iter(data.values()))]
    else:
        raise ValueError(f"no embedding in it (keys: {', '.join(sorted(map(str, data))[:8])})")
    out = []
    for tensor in tensors:
        tensor = tensor.detach().float()
        out.append(tensor.reshape(1, -1) if tensor.ndim == 1 else tensor)
    if any(t.ndim != 2 or t.shape[0] != out[0].shape[0] or t.shape[0] == 0 for t in out):
        raise ValueError(f"unexpected shapes {[list(t.shape) for t in out]}")
    return out


class EmbeddingStore:
    """The embeddings of ``root`` for text encoders of widths ``dims`` (one per encoder), read as they change."""

    def __init__(self, root: Path, dims: tuple[int, ...]):
        self.root = root
        self.dims = dims
        self._loaded: dict[Path, Embedding] = {}

    def current(self) -> dict[str, Embedding]:
        """Every embedding now in the store, by trigger word (a file changed since it was last read is read again;
        one that cannot serve this model carries its ``error``).
        """
        found: dict[str, Embedding] = {}
        seen: set[Path] = set()
        if not self.root.is_dir():
            return found
        for path in sorted(self.root.iterdir()):
            if path.suffix not in SUFFIXES or not is_store_name(path.stem):
                continue
            with contextlib.suppress(OSError):
                stat = path.stat()
                version = (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
                known = self._loaded.get(path)
                if known is None or known.version != version:
                    known = self._read(path, version)
                    self._loaded[path] = known
                found.setdefault(path.stem, known)  # (a.pt beside a.safetensors: the first in name order)
                seen.add(path)
        for gone in set(self._loaded) - seen:
            del self._loaded[gone]
        return found

    def _read(self, path: Path, version: tuple[int, ...]) -> Embedding:
        try:
            vectors = read_vectors(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: one clear refusal naming it
            return Embedding(path.stem, (), version, f"embedding {path.name} cannot be read: {exc}")
        widths = tuple(int(v.shape[1]) for v in vectors)
        if widths != self.dims:
            what = "SDXL (clip_l, clip_g)" if len(widths) == 2 else "one text encoder"
            error = f"embedding {path.name} is for {what} of width {widths}; this model's text encoders: {self.dims}"
            return Embedding(path.stem, (), version, error)
        if vectors[0].shape[0] > MAX_VECTORS:
            error = f"embedding {path.name} has {vectors[0].shape[0]} vectors; at most {MAX_VECTORS} fit a prompt chunk"
            return Embedding(path.stem, (), version, error)
        return Embedding(path.stem, tuple(vectors), version)
