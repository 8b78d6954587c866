"""Stage ``unet``: one denoising step of one or more branches, batched across generation requests.

Each row of a batch carries its own timestep (``TIMESTEP [B]``), so step requests of different generation
requests — at different timesteps, seeds and schedulers — can share one forward pass (step-level batching).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from .components import ModelInfo, load_part
from .config import StageConfig
from .errors import InvalidRequestError


@dataclass
class StepInput:
    """One ``unet`` request: ``sample [b, C, h, w]``, ``timestep [b]``, ``encoder_hidden_states [b, S, D]``."""

    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor

    def validate(self, info: ModelInfo) -> None:
        """Shape/dtype checks naming the tensor; run per request so one bad request fails alone."""
        b = self.sample.shape[0] if self.sample.ndim == 4 else -1
        if self.sample.ndim != 4 or self.sample.shape[1] != info.latent_channels:
            raise InvalidRequestError(
                "SAMPLE", f"expected [b, {info.latent_channels}, h, w], got {list(self.sample.shape)}"
            )
        if self.timestep.numel() != b:
            raise InvalidRequestError("TIMESTEP", f"expected {b} values (one per row), got {list(self.timestep.shape)}")
        ehs = self.encoder_hidden_states
        if ehs.ndim != 3 or ehs.shape[0] != b or ehs.shape[2] != info.cross_attention_dim:
            raise InvalidRequestError(
                "ENCODER_HIDDEN_STATES", f"expected [{b}, S, {info.cross_attention_dim}], got {list(ehs.shape)}"
            )
        for name, t in (("SAMPLE", self.sample), ("TIMESTEP", self.timestep), ("ENCODER_HIDDEN_STATES", ehs)):
            if t.dtype != torch.float32:
                raise InvalidRequestError(name, f"expected FP32, got {t.dtype}")

    def batch_key(self) -> tuple[int, ...]:
        """Rows can be concatenated when their latent size and sequence length agree."""
        return (*self.sample.shape[1:], *self.encoder_hidden_states.shape[1:])


class UNetStep:
    """The denoiser of one model instance: ``UNet2DConditionModel`` on ``cfg.device`` in ``cfg.dtype``."""

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg
        self.info = ModelInfo.read(cfg.model_dir)
        self.model = load_part(UNet2DConditionModel, cfg.model_dir, "unet", cfg.device, cfg.dtype)

    @torch.inference_mode()
    def forward(self, step: StepInput) -> torch.Tensor:
        """One forward pass; returns the noise prediction ``[b, C, h, w]`` float32 on CPU."""
        dev, dt = self.cfg.device, self.cfg.dtype
        out = self.model(
            step.sample.to(dev, dt),
            step.timestep.reshape(-1).to(dev),
            encoder_hidden_states=step.encoder_hidden_states.to(dev, dt),
            return_dict=False,
        )[0]
        return out.float().cpu()

    def forward_many(self, steps: list[StepInput]) -> list[torch.Tensor]:
        """Run several requests' rows together where their shapes allow; one output per input, in order."""
        outputs: list[torch.Tensor | None] = [None] * len(steps)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, step in enumerate(steps):
            groups.setdefault(step.batch_key(), []).append(i)
        for indices in groups.values():
            merged = StepInput(
                torch.cat([steps[i].sample for i in indices]),
                torch.cat([steps[i].timestep.reshape(-1) for i in indices]),
                torch.cat([steps[i].encoder_hidden_states for i in indices]),
            )
            noise = self.forward(merged)
            for i, chunk in zip(indices, noise.split([steps[i].sample.shape[0] for i in indices]), strict=True):
                outputs[i] = chunk
        return outputs  # type: ignore[return-value]


def parse_step(tensors: dict[str, np.ndarray], info: ModelInfo) -> StepInput:
    """Triton tensors of one ``unet`` request → a validated :class:`StepInput`."""
    for name in INPUTS:
        if name not in tensors:
            raise InvalidRequestError(name, "is required")
    step = StepInput(*(torch.from_numpy(np.array(tensors[name])) for name in INPUTS))
    step.validate(info)
    return step


#: Input tensors of the ``unet`` model, in :class:`StepInput` field order.
INPUTS = ("SAMPLE", "TIMESTEP", "ENCODER_HIDDEN_STATES")
