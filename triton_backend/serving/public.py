"""The public models ``txt2img``, ``img2img`` (unary) and their ``_stream`` variants (decoupled): one generation,
its stages over BLS.

They run no model and import no torch: the stub, numpy and a BLS client (~40 MB RSS). A request is three calls,
``text_encoder`` → ``denoise`` → ``vae`` (parameters ``text_encoder_model``, ``denoise_model``, ``vae_model``), so
every request shares ``denoise``'s step scheduler; ``img2img`` first has ``vae`` encode its images (a bad image is
refused before any other work). ``denoise`` reports each step over a per-request socket
(:mod:`triton_backend.serving.progress`); the stream relays the steps, the unary model only watches the socket.

No request is lost when a stage dies (docs/operations.md "Crashes and recovery"):

* **Nothing hangs.** ``denoise`` answers through its response sender after ``execute`` returned, so when its
  process dies Triton never answers the call. Its socket then ends without the closing frame (or, for a request
  still queued there, the process is gone before it connected), and the call is given up at once
  (:meth:`PublicModel.denoise`). A dead stage that was called (``text_encoder``, ``vae``, and
  what those call: ``lora_manager``, ``unet``, ``controlnet``) fails its calls with "Stub process ... is not
  healthy", and a stage being reloaded with "unknown model" or "not ready".
* **The request, not only the stage, recovers.** Each of the three calls is retried on such a failure
  (:func:`is_stage_down`) until it succeeds or the request's :class:`RetryWindow` closes: the text encoding, the
  generation from its first step (deterministic: seed, steps, adapters; LoRA state is per request, never kept
  between attempts), or the VAE decode of the latents already held. The image is the one the request would have
  had. The watchdog of ``swiftdiffusion serve`` reloads a dead stage within ~10 s.
* **Otherwise a retryable error.** When the window closes first, the request fails with ``UNAVAILABLE`` naming the
  stage and saying that a retry is safe (every request is idempotent); never ``INTERNAL``.

An ensemble could not do this: Triton's ensemble scheduler waits for a step that a dead stub never answers.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..errors import InvalidRequestError, StageUnavailableError
from ..schema import DENOISE_INPUTS, IMG2IMG_ONLY, MAX_DEADLINE_MS, TEXT_ENCODER_INPUTS, VAE_ENCODE_INPUTS
from .events import trace
from .io import BlsCall, Tensors, cancellation_check, failure_response, make_response, read_tensors, send_final
from .progress import POLL_S, ProgressListener, preview_every
from .shell import ModelShell
from .watchdog import is_running, stub_processes

T = TypeVar("T")

#: How long an answer of ``denoise`` may still take once its socket ended without its closing frame.
ANSWER_AFTER_HANGUP_S = 2.0
#: ``denoise`` connects to a request's socket as soon as its loop takes the request (at most one UNet pass later):
#: a request not connected after this long was lost with a process that died (it never reached one that runs).
CONNECT_TIMEOUT_S = 20.0
#: How often ``txt2img`` (no step frames) asks whether its client cancelled, while it waits for ``denoise``.
WATCH_POLL_S = 0.25
#: How often a stage seen with no process (being reloaded, or on another server) is looked for again.
RESCAN_S = 1.0
#: Pause between attempts at a stage that is down (it fails fast until it is reloaded).
RETRY_PAUSE_S = 0.5
#: What a call to a stage that is down answers: its stub died (Triton's python backend), its socket ended
#: (:meth:`PublicModel.denoise`), or it is being reloaded (unloaded, loading).
STAGE_DOWN = ("is not healthy", "its process ended", "unknown model", "is not ready", "no available versions")


def stage_alive(model: str) -> Callable[[], bool]:
    """Whether any stub process that runs ``model`` now (a sibling of this stub: a child of the same
    ``tritonserver``) is still alive when asked. While none is seen (the stage is being reloaded) it is looked for
    again at each question, and true; always true outside a Triton stub or for a stage on another server.
    """
    pids = stub_processes(os.getppid()).get(model, [])
    looked = time.monotonic()

    def alive() -> bool:
        nonlocal pids, looked
        if not pids:
            if time.monotonic() - looked >= RESCAN_S:
                pids, looked = stub_processes(os.getppid()).get(model, []), time.monotonic()
            return True
        return any(is_running(pid) for pid in pids)

    return alive


async def until_answered(call: asyncio.Future[T], alive: Callable[[], bool], gone: str) -> T:
    """The answer of ``call``, or ``UNAVAILABLE`` with the message ``gone`` once the stage's processes ended
    (``alive()``, asked every :data:`WATCH_POLL_S`) and no answer is on its way (:func:`answer_or_give_up`).
    """
    while not call.done():
        await asyncio.wait({call}, timeout=WATCH_POLL_S)
        if not call.done() and not alive():
            return await answer_or_give_up(call, gone)
    return call.result()


async def answer_or_give_up(call: asyncio.Future[T], gone: str) -> T:
    """The answer of ``call`` to a stage whose process ended, if it is already on its way
    (:data:`ANSWER_AFTER_HANGUP_S`); else the call is given up: ``UNAVAILABLE`` with the message ``gone``.
    """
    try:
        return await asyncio.wait_for(asyncio.shield(call), ANSWER_AFTER_HANGUP_S)
    except TimeoutError:
        call.cancel()
        raise StageUnavailableError(gone) from None


def is_stage_down(exc: BaseException) -> bool:
    """Whether ``exc`` is a call to a stage whose process died or is being reloaded (worth a retry), as opposed
    to a refusal of the request itself (a bad field, an unknown LoRA, a full queue, a missed deadline).
    """
    return isinstance(exc, StageUnavailableError) and any(s in str(exc) for s in STAGE_DOWN)


@dataclass
class RetryWindow:
    """Until when a request retries a stage that is down: its deadline (``DEADLINE_MS`` after arrival) when it has
    one, else ``retry_window_s`` after the stage was first found down.
    """

    arrival: float
    retry_window_s: float
    deadline_ms: int | None = None
    down_since: float | None = None

    def end(self) -> float:
        if self.deadline_ms:
            return self.arrival + self.deadline_ms / 1000
        return (self.down_since or time.monotonic()) + self.retry_window_s

    def note_down(self, now: float) -> bool:
        """A stage was found down at ``now``: whether a retry can still start in the window."""
        if self.down_since is None:
            self.down_since = now
        return now + RETRY_PAUSE_S < self.end()


async def with_retries(stage: str, window: RetryWindow, attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt()`` until it succeeds, retrying while the stage is down and the window is open; then
    ``UNAVAILABLE`` naming the stage (the last error's cause kept in the message).
    """
    tries = 0
    while True:
        tries += 1
        try:
            result = await attempt()
        except Exception as exc:
            if not is_stage_down(exc):
                raise
            if window.note_down(time.monotonic()):
                trace("stage_retry", stage=stage, attempt=tries)
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            raise StageUnavailableError(
                f"{stage}: down and not back within the retry window ({tries} attempt{'s' * (tries > 1)}; {exc}); "
                "the server restarts a dead stage: retrying the request is safe"
            ) from None
        if tries > 1:
            trace("stage_recovered", stage=stage, attempts=tries)
        return result


class PublicModel(ModelShell):
    """A request: (encode its images,) encode its prompts, denoise (watching its socket), decode, each with retries
    (see the module). Subclasses decide what a step and the end are answered with.
    """

    inputs: tuple[str, ...] = tuple(
        name for name in dict.fromkeys((*TEXT_ENCODER_INPUTS, *DENOISE_INPUTS)) if name not in IMG2IMG_ONLY
    )
    #: ``img2img``: ``INIT_IMAGE`` is required (and ``MASK_IMAGE``, ``STRENGTH`` are inputs).
    image_to_image = False

    async def generate(
        self,
        tensors: Tensors,
        request: Any,
        sender: Any,
        arrival: float,
        on_step: Callable[[Tensors], None] | None = None,
        every: int = 0,
    ) -> Tensors:
        """``IMAGE``, ``IMAGES`` and ``LORA_LANDED_STEP`` of the request; each step of ``denoise`` goes to
        ``on_step``. The client cancelling (``request`` or its ``sender``) stops the generation at its next step.
        """
        if self.image_to_image and tensors.get("INIT_IMAGE") is None:
            raise InvalidRequestError("INIT_IMAGE", "is required: the image to start from (UINT8 [H, W, 3])")
        deadline = tensors.get("DEADLINE_MS")
        deadline_ms = int(np.asarray(deadline).reshape(-1)[0]) if deadline is not None else None
        window = RetryWindow(arrival, self.params["retry_window_s"], deadline_ms)
        if deadline_ms is not None and not 0 < deadline_ms <= MAX_DEADLINE_MS:
            window.deadline_ms = None  # (denoise refuses it by name; no retry for a refused request)
        cancelled = cancellation_check(request, sender)
        images: Tensors = {}
        if "INIT_IMAGE" in tensors:
            outputs = ["INIT_MOMENTS", *(["MASKED_MOMENTS", "LATENT_MASK"] if "MASK_IMAGE" in tensors else [])]
            image_call = (self.called("vae"), {k: v for k, v in tensors.items() if k in VAE_ENCODE_INPUTS}, outputs)
            images = await with_retries(self.called("vae"), window, lambda: self.watched(image_call))
        prompts = {k: v for k, v in tensors.items() if k in TEXT_ENCODER_INPUTS}
        encoder_call = (self.called("text_encoder"), prompts, ["PROMPT_EMBEDS", "POOLED_EMBEDS"])
        encoded = await with_retries(self.called("text_encoder"), window, lambda: self.watched(encoder_call))
        fields = {k: v for k, v in tensors.items() if k in DENOISE_INPUTS} | encoded | images
        result = await with_retries(
            self.called("denoise"), window, lambda: self.denoise(fields, cancelled, on_step, every)
        )
        vae_call = (self.called("vae"), {"LATENTS": result["LATENTS"]}, ["IMAGES"])
        decoded = await with_retries(self.called("vae"), window, lambda: self.watched(vae_call))
        return {
            "IMAGE": decoded["IMAGES"][0],
            "IMAGES": decoded["IMAGES"],
            "LORA_LANDED_STEP": result["LORA_LANDED_STEP"],
        }

    async def watched(self, call: BlsCall) -> Tensors:
        """One BLS call, given up (naming the stage) when every process of the stage that ran at the call ended
        before it answered: a stage that dies with a request inside does not always answer it.
        """
        alive = stage_alive(call[0])
        task = asyncio.ensure_future(self.bls.infer([call]))
        return (await until_answered(task, alive, f"{call[0]}: its process ended under the request"))[0]

    async def denoise(
        self, fields: Tensors, cancelled: Callable[[], bool], on_step: Callable[[Tensors], None] | None, every: int
    ) -> Tensors:
        """One ``denoise`` call with its progress socket. When the socket ended without its closing frame (and
        this side did not hang up), or the ``denoise`` processes that ran at the call all ended before it connected
        (the request was still queued there), the stage's process ended: Triton never answers a request that a stub
        answers through its response sender once that stub is gone, so the call is given up now, naming the stage.
        (:data:`ANSWER_AFTER_HANGUP_S` lets an answer already on its way arrive.)
        """
        async with ProgressListener() as progress:
            inputs = fields | {
                "PREVIEW_EVERY": np.array([every], np.int32),
                "PROGRESS_ADDRESS": np.array([progress.address.encode()], np.object_),
                # txt2img only watches the socket: no frame per step (each would wake this process under a pass).
                "PROGRESS_STEPS": np.array([on_step is not None]),
            }
            call = (self.called("denoise"), inputs, ["LATENTS", "LORA_LANDED_STEP"])
            denoised = asyncio.ensure_future(self.bls.infer([call]))
            last = None
            poll_s = POLL_S if on_step is not None else WATCH_POLL_S
            alive = stage_alive(self.called("denoise"))
            called_at = time.monotonic()

            def gone() -> bool:  # (its processes ended, or the request never reached one that runs: never connected)
                silent = not progress.connected and time.monotonic() - called_at > CONNECT_TIMEOUT_S
                return silent or not alive()

            async for last in progress.events(denoised, cancelled, poll_s=poll_s, gone=gone):
                if on_step is not None:
                    on_step(last)
            if progress.ended or progress.hung_up or denoised.done():
                # (its process may still die between the closing frame and its answer)
                gone_msg = f"{self.called('denoise')}: its process ended after its last step"
                return (await until_answered(denoised, alive, gone_msg))[0]
            at = f" at step {int(last['STEP'][0])} of {int(last['TOTAL_STEPS'][0])}" if last is not None else ""
            return (await answer_or_give_up(denoised, f"{self.called('denoise')}: its process ended{at}"))[0]

    async def answer(self, request: Any, sender: Any, arrival: float) -> None:
        raise NotImplementedError

    def execute(self, requests: list[Any]) -> None:
        arrival = time.monotonic()
        for request in requests:
            self.bls.submit(self.answer(request, request.get_response_sender(), arrival))


class Txt2ImgModel(PublicModel):
    """``txt2img`` (unary, what perf_analyzer and ``tritonclient`` call): the request's fields → ``IMAGE``
    (UINT8 [H, W, 3], the first image), ``IMAGES`` (UINT8 [n, H, W, 3], ``NUM_IMAGES``) and ``LORA_LANDED_STEP``
    (INT32 [1]); answered through the response sender when done.
    """

    role = "txt2img"

    async def answer(self, request: Any, sender: Any, arrival: float) -> None:
        try:
            tensors = read_tensors(request, self.inputs, self.pb)
            response = make_response(await self.generate(tensors, request, sender, arrival), self.pb, request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error response
            response = failure_response(exc, self.pb, self.logger)
        send_final(sender, response, self.pb)


class StreamModel(PublicModel):
    """``txt2img_stream`` (decoupled): ``txt2img``'s inputs plus ``PREVIEW_EVERY`` (INT32 [1], 0 = no previews) →
    one response per step with ``STEP`` and ``TOTAL_STEPS`` (INT32 [1]) and, every ``PREVIEW_EVERY`` steps,
    ``PREVIEW`` (UINT8 [h, w, 3] at the latent resolution, :func:`~triton_backend.stages.preview.latent_rgb`), then
    the final response with ``IMAGE`` and ``LORA_LANDED_STEP``, equal to ``txt2img``'s for the same request. A
    request the client cancels (a closed stream) stops at the next step. A generation retried after its ``denoise``
    died starts its steps again from 1.
    """

    role = "txt2img_stream"
    inputs = (*PublicModel.inputs, "PREVIEW_EVERY")

    async def answer(self, request: Any, sender: Any, arrival: float) -> None:
        try:
            tensors = read_tensors(request, self.inputs, self.pb)
            every = preview_every(tensors.pop("PREVIEW_EVERY", None))
            response = make_response(
                await self.generate(
                    tensors,
                    request,
                    sender,
                    arrival,
                    lambda step: sender.send(make_response(step, self.pb, request)),
                    every,
                ),
                self.pb,
                request,
            )
        except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error response
            response = failure_response(exc, self.pb, self.logger)
        send_final(sender, response, self.pb)


class Img2ImgModel(Txt2ImgModel):
    """``img2img`` (unary): ``txt2img``'s fields plus ``INIT_IMAGE`` (required), ``STRENGTH`` and ``MASK_IMAGE``
    (inpainting) → ``txt2img``'s outputs at the init image's size (:mod:`triton_backend.schema`).
    """

    role = "img2img"
    inputs = (*PublicModel.inputs, *IMG2IMG_ONLY)
    image_to_image = True


class Img2ImgStreamModel(StreamModel):
    """``img2img_stream`` (decoupled): ``img2img``'s inputs plus ``PREVIEW_EVERY``; ``txt2img_stream``'s responses
    (the steps ``STRENGTH`` leaves).
    """

    role = "img2img_stream"
    inputs = (*StreamModel.inputs, *IMG2IMG_ONLY)
    image_to_image = True
