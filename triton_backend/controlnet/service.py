"""Stage ``controlnet``: the shared ControlNet service (model LRU, hint-embedding cache, batching by ControlNet).

Two kinds of request arrive (Triton's dynamic batcher never mixes requests with different input sets):

* *prepare* (``CONTROLNET_NAME``, ``HINT_IMAGE [H, W, 3]`` uint8): the hint image's conditioning embedding
  (``controlnet_cond_embedding``) is the same at every step of a request, so it is computed once and written as a
  file under a shared-memory directory; the request's ``denoise`` removes those files when the request ends
  (succeeded, failed or cancelled). Any instance of this model can map them.
* *step* (``CONTROLNET_NAME``, ``HINT_FILE``, ``SAMPLE``, ``TIMESTEP``, ``ENCODER_HIDDEN_STATES``, ``SCALE``):
  rows of every request that uses the same ControlNet run in one forward pass; each row's residuals are scaled by
  its own conditioning scale (as ``ControlNetModel.forward`` does) and returned packed as ``RESIDUALS [b, N]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ..cache import ByteLRU, LRUStats
from ..config import StageConfig
from ..errors import InvalidRequestError, NotFoundError
from ..model_info import ModelInfo
from ..parameters import mib
from ..paths import controlnet_dir, is_store_name
from ..shm import STAGE_DIR_PREFIXES, save_tensors, stage_dir
from .unet_split import pack_residuals

#: Directory-name prefix of hint-embedding files (the service maps only files under such a directory).
HINT_DIR_PREFIX = STAGE_DIR_PREFIXES[1]
#: File-name prefix of the hint-embedding cache's own files (a request's files are ``<controlnet>-<uuid>``).
HINT_CACHE_PREFIX = "cache-"
#: Hint embeddings (tensors) the steps read, kept in this process by hint file, so a request's file is read at its
#: first step, not at each step. A count, not a byte budget (``hint_cache_mb`` is the separate shared-memory cache of
#: hint files across requests): it need only hold the hints of the requests in flight, one file per request and
#: ControlNet; 64 is four times the rows of the largest step batch (``max_batch_size: 16``), and a finished request's
#: entry falls out behind newer ones. Each is ``[1, C, h/8, w/8]`` float32 (SD1 at 512 x 512: 320 channels, 5 MiB).
HINT_TENSORS_KEPT = 64


def controlnet_names(root: Path) -> list[str]:
    """Every servable ControlNet: sub-directories of the store with a ``config.json``, read now."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


@dataclass
class ControlRow:
    """One step request to the service: ``b`` rows of one generation request and one ControlNet."""

    name: str
    hint_file: str
    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    scale: torch.Tensor
    #: SDXL ControlNets: the step's added conditioning (pooled text embeddings, time ids), one row per row.
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    @classmethod
    def from_step(cls, step: Any, name: str, hint_file: str, scale: float) -> ControlRow:
        """The row of one ControlNet of a ``unet`` step (a ``StepInput``): same inputs, the ControlNet's scale."""
        rows = step.sample.shape[0]
        return cls(
            name,
            hint_file,
            step.sample,
            step.timestep,
            step.encoder_hidden_states,
            torch.full((rows, 1), float(scale)),
            step.text_embeds,
            step.time_ids,
        )


@dataclass
class ControlNetService:
    """Resident ControlNets (LRU of ``capacity``) for one model instance, checked against the base UNet.

    ``stats``: the resident ControlNets' LRU (hits and misses per lookup, loads and their seconds).
    """

    cfg: StageConfig
    capacity: int = 4
    stats: LRUStats = field(default_factory=LRUStats)
    #: The dtype residuals leave in (the config's ``RESIDUALS`` data type; the UNet casts to its own).
    residual_dtype: torch.dtype = torch.float32
    #: Byte budget of the hint-embedding cache (parameter ``hint_cache_mb``; 0 = off).
    hint_cache_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        self.root = controlnet_dir(self.cfg.params, self.cfg.model_dir)
        self.unet_config = json.loads((self.cfg.model_dir / "unet" / "config.json").read_text())
        self.info = ModelInfo.read(self.cfg.model_dir)
        #: Resident ControlNets: name → (signature, model, its cond embedding); ``capacity`` of them.
        self._models: ByteLRU[tuple[str, torch.nn.Module, torch.nn.Module]] = ByteLRU(
            self.capacity, size=lambda _: 1, stats=self.stats
        )
        #: Hint tensors by hint file (:data:`HINT_TENSORS_KEPT`).
        self._hints: ByteLRU[torch.Tensor] = ByteLRU(HINT_TENSORS_KEPT, size=lambda _: 1)
        self._lock = threading.Lock()
        #: Hint embeddings of requests in flight; this process holds the directory's lock (:mod:`~triton_backend.shm`).
        self.hint_root, self._owner_fd = stage_dir(HINT_DIR_PREFIX)
        #: Hint embeddings across requests: (ControlNet, its signature, image hash, image shape) → a file that each
        #: request using it gets a hard link to (its own name, removed at request end; the data stays while the
        #: cache or any request links it).
        self.hint_cache: ByteLRU[Path] = ByteLRU(
            self.hint_cache_bytes, size=lambda p: p.stat().st_size, on_evict=lambda p: p.unlink(missing_ok=True)
        )

    @classmethod
    def from_config(cls, cfg: StageConfig) -> ControlNetService:
        return cls(
            cfg,
            cfg.params["resident_capacity"],
            hint_cache_bytes=mib(cfg.params["hint_cache_mb"]),
        )

    def names(self) -> list[str]:
        return controlnet_names(self.root)

    @property
    def resident(self) -> int:
        """How many ControlNets are resident now."""
        return len(self._models)

    def _check_architecture(self, name: str, config: dict) -> None:
        unet = self.unet_config
        theirs = "SDXL" if config.get("addition_embed_type") == "text_time" else "SD1.x/2.x"
        if config.get("addition_embed_type") != unet.get("addition_embed_type"):
            raise InvalidRequestError(
                "CONTROLNET_NAMES",
                f"{name}: an {theirs} ControlNet (addition_embed_type {config.get('addition_embed_type')!r}); this "
                f"model is {self.info.arch_label} (addition_embed_type {unet.get('addition_embed_type')!r})",
            )
        # Residual shapes and the added-conditioning widths must agree; depth (transformer layers) may differ.
        keys = (
            "cross_attention_dim",
            "block_out_channels",
            "in_channels",
            "layers_per_block",
            "projection_class_embeddings_input_dim",
            "addition_time_embed_dim",
        )
        for key in keys:
            base = self.info.latent_channels if key == "in_channels" else unet.get(key)  # (an inpainting UNet: 9)
            if key in config and config[key] != base:
                raise InvalidRequestError(
                    "CONTROLNET_NAMES",
                    f"{name}: architecture does not match the base model ({key} {config[key]} != {base})",
                )

    def model(self, name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
        """``(controlnet, cond_embedding)`` for ``name``: resident (a hit) or loaded now (a miss, may evict)."""
        _, model, embedding = self._resident(name)
        return model, embedding

    def _resident(self, name: str) -> tuple[str, torch.nn.Module, torch.nn.Module]:
        """``(signature, controlnet, cond_embedding)`` of :meth:`model`."""
        from diffusers import ControlNetModel

        if not is_store_name(name):
            raise InvalidRequestError("CONTROLNET_NAMES", f"{name!r} is not a valid ControlNet name")
        path = self.root / name
        if not (path / "config.json").is_file():
            raise NotFoundError("CONTROLNET_NAMES", name, self.names())
        signature = f"{(path / 'config.json').stat().st_mtime_ns}"
        with self._lock:
            entry = self._models.get(name, valid=lambda e: e[0] == signature)
            if entry is not None:
                return entry
            try:
                config = json.loads((path / "config.json").read_text())
            except ValueError as exc:
                raise InvalidRequestError("CONTROLNET_NAMES", f"{name}: corrupt config.json ({exc})") from None
            self._check_architecture(name, config)
            start = time.perf_counter()
            try:
                with self.cfg.compute():
                    model = ControlNetModel.from_pretrained(str(path), torch_dtype=self.cfg.dtype)
            except Exception as exc:  # noqa: BLE001 - corrupt weights, missing files
                raise InvalidRequestError(
                    "CONTROLNET_NAMES", f"{name}: cannot load ({type(exc).__name__}: {exc})"
                ) from None
            model = model.to(self.cfg.device).eval().requires_grad_(False)
            # The hint embedding is computed once per request (prepare); steps pass the embedding through.
            embedding = model.controlnet_cond_embedding
            model.controlnet_cond_embedding = torch.nn.Identity()
            self.stats.loads += 1
            self.stats.load_seconds += time.perf_counter() - start
            entry = (signature, model, embedding)
            self._models.put(name, entry)
            return entry

    @torch.inference_mode()
    def prepare(self, name: str, image: np.ndarray) -> str:
        """Conditioning embedding of one hint image (``[H, W, 3]`` uint8, preprocessed like diffusers: ``/255``)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InvalidRequestError(
                "CONTROLNET_IMAGES", f"expected UINT8 [H, W, 3], got {image.dtype} {list(image.shape)}"
            )
        signature, _, embedding = self._resident(name)
        image = np.ascontiguousarray(image)
        # The content hash, shape and the ControlNet's signature: a changed image, size or ControlNet misses.
        key = (name, signature, hashlib.sha256(image.data).hexdigest(), image.shape)
        file = self.hint_root / f"{name}-{uuid.uuid4().hex}.safetensors"
        cached = self.hint_cache.get(key)
        if cached is not None:
            try:
                os.link(cached, file)
                return str(file)
            except FileNotFoundError:  # removed under us (a sweep): embed again
                self.hint_cache.pop(key)
        cond = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
        with self.cfg.compute():
            emb = embedding(cond.to(self.cfg.device, self.cfg.dtype))
        # This instance keeps it where its steps use it; the file is for the service's other instances.
        self._hints.put(str(file), emb)
        save_tensors(
            {"embedding": emb.float().cpu()}, file, "controlnet", "free shared memory (hint embeddings live there)"
        )
        if self.hint_cache.budget_bytes:
            entry = self.hint_root / f"{HINT_CACHE_PREFIX}{uuid.uuid4().hex}.safetensors"
            os.link(file, entry)
            self.hint_cache.put(key, entry)
        return str(file)

    def validate(self, row: ControlRow) -> None:
        """The added conditioning must match the base model's architecture (checked per request)."""
        self.info.check_added(row.sample.shape[0], row.text_embeds, row.time_ids)

    def _hint(self, file: str) -> torch.Tensor:
        path = Path(file)
        if path.suffix != ".safetensors" or not path.parent.name.startswith(HINT_DIR_PREFIX):
            raise InvalidRequestError("HINT_FILE", f"{file} is not a controlnet hint file")
        emb = self._hints.get(file)
        if emb is not None:
            return emb
        try:
            emb = load_file(file)["embedding"].to(self.cfg.device, self.cfg.dtype)
        except (OSError, KeyError) as exc:
            raise InvalidRequestError("HINT_FILE", f"{file}: released or unreadable ({exc})") from None
        self._hints.put(file, emb)
        return emb

    @torch.inference_mode()
    def step_many(self, rows: list[ControlRow]) -> list[torch.Tensor]:
        """Residuals for every request, packed ``[b, N]``; rows that use the same ControlNet share one pass."""
        with self.cfg.compute():
            return self._step_many(rows)

    def _step_many(self, rows: list[ControlRow]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault((row.name, *row.sample.shape[1:], *row.encoder_hidden_states.shape[1:]), []).append(i)
        dev, dt = self.cfg.device, self.cfg.dtype
        for (name, *_), idx in groups.items():
            model, _ = self.model(name)
            cond = torch.cat([self._hint(rows[i].hint_file).expand(rows[i].sample.shape[0], -1, -1, -1) for i in idx])
            added = None
            if self.info.is_sdxl:
                added = {
                    k: torch.cat([getattr(rows[i], k) for i in idx]).to(dev, dt) for k in ("text_embeds", "time_ids")
                }
            # (an inpainting UNet's sample carries the mask and the masked image after the latents: the ControlNet
            # takes the latents, as diffusers' ControlNet inpaint pipelines give it)
            latents = self.info.latent_channels
            down, mid = model(
                torch.cat([rows[i].sample[:, :latents] for i in idx]).to(dev, dt),
                torch.cat([rows[i].timestep.reshape(-1) for i in idx]).to(dev),
                encoder_hidden_states=torch.cat([rows[i].encoder_hidden_states for i in idx]).to(dev, dt),
                controlnet_cond=cond.to(dev, dt),
                conditioning_scale=1.0,
                added_cond_kwargs=added,
                return_dict=False,
            )
            scale = torch.cat([rows[i].scale.reshape(-1) for i in idx]).to(dev, dt).reshape(-1, 1, 1, 1)
            packed = pack_residuals([d * scale for d in down], mid * scale).to(self.residual_dtype)
            for i, chunk in zip(idx, packed.split([rows[i].sample.shape[0] for i in idx]), strict=True):
                out[i] = chunk
        if dev.type == "cuda":  # (they leave by DLPack: finished before the caller reads them)
            torch.cuda.current_stream(dev).synchronize()
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.hint_cache.clear()
        shutil.rmtree(self.hint_root, ignore_errors=True)
        os.close(self._owner_fd)
