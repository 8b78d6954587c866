"""Triton model ``txt2img_stream``: ``txt2img`` with one response per step; it runs no model and imports no torch.

Its process holds the Python backend stub, numpy and its BLS client (~40 MB RSS), not a copy of torch and diffusers
(~400 MB): the generation itself runs in ``denoise``, under the same step scheduler as every ``txt2img`` request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from ..errors import StageUnavailableError
from ..schema import DENOISE_INPUTS, TEXT_ENCODER_INPUTS
from .io import cancellation_check, failure_response, make_response, read_tensors, send_final
from .progress import ProgressListener, preview_every
from .shell import ModelShell

#: How long an answer of ``denoise`` may still take once its socket ended without its closing frame.
ANSWER_AFTER_HANGUP_S = 2.0


class StreamModel(ModelShell):
    """``txt2img_stream`` (decoupled): ``txt2img``'s inputs plus ``PREVIEW_EVERY`` (INT32 [1], 0 = no previews) →
    one response per step with ``STEP`` and ``TOTAL_STEPS`` (INT32 [1]) and, every ``PREVIEW_EVERY`` steps,
    ``PREVIEW`` (UINT8 [h, w, 3] at the latent resolution, :func:`~triton_backend.stages.preview.latent_rgb`), then
    the final response with ``IMAGE`` and ``LORA_LANDED_STEP``, equal to ``txt2img``'s for the same request.

    The ``txt2img`` ensemble's three calls over BLS (parameters ``text_encoder_model``, ``denoise_model``,
    ``vae_model``); ``denoise`` sends its steps over a per-request socket (:mod:`triton_backend.serving.progress`).
    A request the client cancels (a closed stream) stops at the next step.
    """

    role = "txt2img_stream"

    inputs = (*dict.fromkeys((*TEXT_ENCODER_INPUTS, *DENOISE_INPUTS)), "PREVIEW_EVERY")

    async def answer(self, request: Any, sender: Any) -> None:
        """Encode, denoise while relaying its steps, decode; then the final response (or the request's error)."""
        try:
            tensors = read_tensors(request, self.inputs, self.pb)
            every = preview_every(tensors.get("PREVIEW_EVERY"))
            prompts = {k: v for k, v in tensors.items() if k in TEXT_ENCODER_INPUTS}
            encoder_outputs = ["PROMPT_EMBEDS", "POOLED_EMBEDS"]
            (encoded,) = await self.bls.infer([(self.called("text_encoder"), prompts, encoder_outputs)])
            async with ProgressListener() as progress:
                fields = {k: v for k, v in tensors.items() if k in DENOISE_INPUTS}
                fields |= {"PREVIEW_EVERY": np.array([every], np.int32)}
                fields |= {"PROGRESS_ADDRESS": np.array([progress.address.encode()], np.object_)}
                call = (self.called("denoise"), {**fields, **encoded}, ["LATENTS", "LORA_LANDED_STEP"])
                denoised = asyncio.ensure_future(self.bls.infer([call]))
                last = None
                async for last in progress.events(denoised, cancellation_check(request, sender)):
                    sender.send(make_response(last, self.pb))
                result = await self.answer_of(denoised, progress, last)
            (decoded,) = await self.bls.infer([(self.called("vae"), {"LATENTS": result["LATENTS"]}, ["IMAGE"])])
            response = make_response(
                {"IMAGE": decoded["IMAGE"], "LORA_LANDED_STEP": result["LORA_LANDED_STEP"]}, self.pb
            )
        except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error response
            response = failure_response(exc, self.pb, self.logger)
        send_final(sender, response, self.pb)

    async def answer_of(
        self, denoised: asyncio.Future[list[Any]], progress: ProgressListener, last: dict[str, np.ndarray] | None
    ) -> Any:
        """``denoise``'s answer. When its socket ended without its closing frame (and this side did not hang up),
        its process ended: Triton never answers a request that a stub answers through its response sender once
        that stub is gone, so this request fails now, naming the stage (the watchdog reloads it), instead of at the
        client's deadline. (:data:`ANSWER_AFTER_HANGUP_S` lets an answer already on its way arrive.)
        """
        if progress.ended or progress.hung_up or not progress.connected or denoised.done():
            return (await denoised)[0]
        try:
            return (await asyncio.wait_for(asyncio.shield(denoised), ANSWER_AFTER_HANGUP_S))[0]
        except TimeoutError:
            denoised.cancel()
            at = f" at step {int(last['STEP'][0])} of {int(last['TOTAL_STEPS'][0])}" if last is not None else ""
            raise StageUnavailableError(
                f"{self.called('denoise')}: its process ended{at} (the server reloads the stage; retry the request)"
            ) from None

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self.bls.submit(self.answer(request, request.get_response_sender()))
