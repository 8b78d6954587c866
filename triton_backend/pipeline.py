"""Every stage of ``txt2img`` wired together in one process: the same stage code Triton runs, without the servers.

For tests against diffusers, benchmarks of the stages themselves and debugging a model directory without
Triton. ``unet`` runs its ControlNets through a local :class:`ControlNetService` (encoder half, then residuals);
LoRAs come from a local :class:`LoraStore` and land at ``LORA_BOUND_K`` (or after ``lora_ready_after`` polls).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import StageConfig
from .controlnet.service import ControlNetService, ControlRow
from .lora.convert import convert_lora_file, load_skeletons
from .lora.patch import AdapterRef
from .lora.store import CACHE_DIR_PREFIX, LoraStore
from .model_info import ModelInfo
from .paths import lora_dir
from .schema import GenerationRequest
from .stages import denoise
from .stages.text_encoder import TextEncoder
from .stages.unet import StepInput, UNetStep
from .stages.vae import Vae


class ReadyLoad:
    """A LoRA load that reports done after ``after`` polls (``after = 0``: at once), like a finished future."""

    def __init__(self, adapters: tuple[AdapterRef, ...], after: int = 0):
        self.adapters, self.after, self.polls = adapters, after, 0

    def done(self) -> bool:
        self.polls += 1
        return self.polls > self.after

    def result(self) -> tuple[AdapterRef, ...]:
        return self.adapters


@dataclass
class LocalResult:
    #: ``[n, H, W, 3]``: the request's ``NUM_IMAGES`` images.
    images: np.ndarray
    landed_step: int

    @property
    def image(self) -> np.ndarray:
        return self.images[0]


class LocalPipeline:
    """(``vae`` encoding →) ``text_encoder`` → ``denoise`` (→ ``unet`` → ``controlnet``) → ``vae`` in this process."""

    def __init__(self, model_dir: Path):
        def cfg(role: str) -> StageConfig:  # (each stage as its model would load it, on this device)
            return StageConfig.from_params(role, {"model_dir": str(model_dir)})

        self.cfg = cfg("text_encoder")
        self.info = ModelInfo.read(self.cfg.model_dir)
        self.text_encoder = TextEncoder(self.cfg)
        self.unet = UNetStep(cfg("unet"))
        self.vae = Vae(cfg("vae"))
        self.controlnets = ControlNetService(cfg("controlnet"))
        skeletons = load_skeletons(cfg("lora_manager"))  # separate from the served modules, as in lora_manager
        self._cache = tempfile.mkdtemp(prefix=CACHE_DIR_PREFIX + "local-")
        self.loras = LoraStore(
            root=lora_dir(self.cfg.params, self.cfg.model_dir),
            convert=lambda path: convert_lora_file(path, skeletons),
            cache_root=Path(self._cache),
        )

    def control(self, step: StepInput):
        """The in-process ``ControlFn``: one service row per ControlNet of the step."""
        rows = [ControlRow.from_step(step, ref.name, ref.hint_file, ref.scale) for ref in step.controlnets]
        return lambda: self.controlnets.step_many(rows)

    def unet_fn(self, *call) -> torch.Tensor:
        return self.unet.forward_many([StepInput.of(*call)], self.control)[0]

    def adapters(self, loras: Sequence[tuple[str, float]]) -> tuple[AdapterRef, ...]:
        """``[(name, scale)]`` → ``AdapterRef``s of files converted by the local LoRA store."""
        return tuple(AdapterRef(n, str(self.loras.get(n).file), s) for n, s in loras)

    def generate(
        self, request: GenerationRequest, latent_parallel: bool = False, lora_ready_after: int = 0
    ) -> LocalResult:
        """The request's images; LoRAs land when ready (after ``lora_ready_after`` polls) or at the request's bound k
        (0). With ``init_image``: img2img (with ``mask_image``: inpainting).
        """
        adapters = self.adapters(request.loras)
        text_adapters = adapters if adapters and self.text_encoder.needs_loras(request) else ()
        encoded = self.text_encoder.encode_request(request, text_adapters)
        if request.init_image is not None:
            encoded |= self.vae.encode(request.init_image, request.mask_image)
        state = denoise.prepare_encoded(request, encoded, self.info)
        if adapters:
            k = request.lora_bound_k if request.lora_bound_k is not None else 0
            denoise.attach_loras(state, ReadyLoad(adapters, lora_ready_after), k)
        unet = denoise.latent_parallel(lambda calls: [self.unet_fn(*c) for c in calls]) if latent_parallel else None
        try:
            if request.controlnet_names:
                denoise.attach_controlnets(
                    state, lambda hints: [self.controlnets.prepare(n, img) for n, img in hints], self.info
                )
            latents = denoise.run(state, unet or self.unet_fn)
        finally:
            denoise.release_hints(state)
        return LocalResult(self.vae.decode_all(latents), state.landed_step)

    def close(self) -> None:
        self.loras.close()
        self.controlnets.close()
