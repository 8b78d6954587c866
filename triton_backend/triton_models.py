"""The Triton model classes; each ``model_repository/<stage>/1/model.py`` subclasses one of these.

``initialize`` parses ``args`` once into a :class:`~triton_backend.config.StageConfig` (a bad parameter fails the
load and names it); ``execute`` converts tensors and calls one function of the stage. ``triton_python_backend_utils``
exists only inside the Triton stub, so it is imported in ``initialize``.
"""

from __future__ import annotations

from typing import Any

from .config import StageConfig
from .triton_io import bls_infer, is_cancelled, read_tensors, respond_batched, respond_each


class _StageModel:
    """Common shape: typed config at load, one response per request in order, errors mapped in one place."""

    inputs: tuple[str, ...] = ()

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.logger = pb_utils.Logger
        self.cfg = StageConfig.from_triton_args(args)
        self.cfg.apply_threads()
        self.stage = self.build(self.cfg)

    def build(self, cfg: StageConfig) -> Any:
        raise NotImplementedError

    def handle(self, tensors: dict[str, Any], request: Any) -> dict[str, Any]:
        return self.stage.handle(tensors)

    def execute(self, requests: list[Any]) -> list[Any]:
        return respond_each(
            requests, lambda r: self.handle(read_tensors(r, self.inputs, self.pb), r), self.pb, self.logger
        )

    def finalize(self) -> None:
        self.stage = None


class TextEncoderModel(_StageModel):
    """``text_encoder``: ``PROMPT``, ``NEGATIVE_PROMPT``, ``GUIDANCE_SCALE`` → ``PROMPT_EMBEDS [B, 77, D]`` FP32."""

    from .text_encoding import INPUTS as inputs

    def build(self, cfg: StageConfig) -> Any:
        from .text_encoding import TextEncoder

        return TextEncoder(cfg)


class VaeModel(_StageModel):
    """``vae``: ``LATENTS [1, 4, h, w]`` FP32 → ``IMAGE [8h, 8w, 3]`` UINT8."""

    inputs = ("LATENTS",)

    def build(self, cfg: StageConfig) -> Any:
        from .vae_decode import VaeDecoder

        return VaeDecoder(cfg)


class DenoiseModel(_StageModel):
    """``denoise``: request fields + ``PROMPT_EMBEDS`` → ``LATENTS``; calls ``unet`` over BLS once per step."""

    from .denoise import INPUTS as _fields

    inputs = ("PROMPT_EMBEDS", *_fields)

    def build(self, cfg: StageConfig) -> Any:
        from .denoise import Denoiser

        self.unet_model = cfg.stage("unet")
        return Denoiser(cfg)

    def handle(self, tensors: dict[str, Any], request: Any) -> dict[str, Any]:
        import torch

        def unet(sample: Any, timestep: Any, hidden: Any) -> Any:
            out = bls_infer(
                self.pb,
                self.unet_model,
                {
                    "SAMPLE": sample.numpy(),
                    "TIMESTEP": timestep.reshape(-1, 1).numpy(),
                    "ENCODER_HIDDEN_STATES": hidden.numpy(),
                },
                ["NOISE_PRED"],
            )
            return torch.from_numpy(out["NOISE_PRED"])

        return self.stage.handle(tensors, unet, is_cancelled=lambda: is_cancelled(request))


class UNetModel(_StageModel):
    """``unet`` (dynamic batching): ``SAMPLE [b, 4, h, w]``, ``TIMESTEP [b, 1]``, ``ENCODER_HIDDEN_STATES [b, S, D]``
    → ``NOISE_PRED [b, 4, h, w]``; rows of several requests run in one forward pass.
    """

    from .unet_step import INPUTS as inputs

    def build(self, cfg: StageConfig) -> Any:
        from .unet_step import UNetStep

        return UNetStep(cfg)

    def execute(self, requests: list[Any]) -> list[Any]:
        from .unet_step import parse_step

        def compute_many(steps: list[Any]) -> list[dict[str, Any]]:
            return [{"NOISE_PRED": out.numpy()} for out in self.stage.forward_many(steps)]

        return respond_batched(
            requests,
            lambda r: parse_step(read_tensors(r, self.inputs, self.pb), self.stage.info),
            compute_many,
            self.pb,
        )
