"""A small typed gRPC client for the ``txt2img`` model, built on ``tritonclient.grpc``.

Inputs are built from the same schema the server parses (:mod:`triton_backend.schema`), so the two cannot drift.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from triton_backend.errors import parse_error_tag
from triton_backend.schema import FIELDS_BY_NAME, GenerationRequest


class ClientError(Exception):
    """The server answered with an error; ``status`` is the gRPC status, ``message`` the server's message."""

    def __init__(self, status: str, message: str):
        self.status = status
        self.message = message
        super().__init__(f"{status}: {message}")


class InvalidArgumentError(ClientError):
    """A request field was rejected (the message names it)."""


class NotFoundError(ClientError):
    """An unknown model, LoRA or ControlNet (the message lists what exists)."""


class RequestCancelledError(ClientError):
    """The request was cancelled."""


class ServerUnavailableError(ClientError):
    """The server or one of its stages is down or unreachable."""


_BY_STATUS = {
    "StatusCode.INVALID_ARGUMENT": InvalidArgumentError,
    "StatusCode.NOT_FOUND": NotFoundError,
    "StatusCode.CANCELLED": RequestCancelledError,
    "StatusCode.UNAVAILABLE": ServerUnavailableError,
}


#: Our error tags (``[CODE] message``) → gRPC status: a streamed response's error carries only the message.
_BY_TAG = {
    "INVALID_ARG": "StatusCode.INVALID_ARGUMENT",
    "NOT_FOUND": "StatusCode.NOT_FOUND",
    "CANCELLED": "StatusCode.CANCELLED",
    "UNAVAILABLE": "StatusCode.UNAVAILABLE",
}


def _raise_typed(exc: InferenceServerException) -> None:
    status = str(exc.status() or _BY_TAG.get(parse_error_tag(exc.message() or "")[0], "StatusCode.UNKNOWN"))
    raise _BY_STATUS.get(status, ClientError)(status, exc.message() or str(exc)) from exc


def build_inputs(request: GenerationRequest) -> list[grpcclient.InferInput]:
    """``txt2img`` inputs for ``request`` (unset optional fields are omitted; the server applies defaults)."""
    inputs = []
    for name, value in request.to_tensors().items():
        tensor = grpcclient.InferInput(name, list(value.shape), FIELDS_BY_NAME[name].triton_dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


@dataclass(frozen=True)
class GenerationResult:
    """What ``txt2img`` / ``img2img`` return: the images (``[n, H, W, 3]`` uint8, ``NUM_IMAGES``) and the step the
    LoRAs landed at (-1: no LoRAs).
    """

    images: np.ndarray
    lora_landed_step: int = -1

    @property
    def image(self) -> np.ndarray:
        """The first image, ``[H, W, 3]`` (the only one unless ``NUM_IMAGES`` > 1)."""
        return self.images[0]


@dataclass(frozen=True)
class Progress:
    """One step of a streamed generation: ``step`` of ``total_steps`` done; ``preview`` (``[h, w, 3]`` uint8 at the
    latent resolution) every ``preview_every`` steps, else ``None``.
    """

    step: int
    total_steps: int
    preview: np.ndarray | None = None


def _scalar(result: Any, name: str, default: int = -1) -> int:
    value = result.as_numpy(name)
    return int(value.reshape(-1)[0]) if value is not None else default


class Client:
    """Context-managed client for one server: ``generate`` returns the ``IMAGE [H, W, 3]`` uint8 array."""

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        model: str = "txt2img",
        timeout_s: float | None = None,
        tls_root_cert: str | None = None,
    ):
        """``tls_root_cert``: a PEM file to verify a server that serves gRPC over TLS (``serve --tls-cert``)."""
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        if tls_root_cert:
            self._client = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=tls_root_cert)
        else:
            self._client = grpcclient.InferenceServerClient(url)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def is_ready(self) -> bool:
        """True when the server and ``txt2img`` are ready."""
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model))
        except InferenceServerException:
            return False

    def can_stream(self, request: GenerationRequest | None = None) -> bool:
        """True when the server serves the streaming model of ``request``'s model (``<model>_stream``; a repository
        rendered with ``--no-stream`` has none).
        """
        model = self.model if request is None else self.model_for(request)
        try:
            return bool(self._client.is_model_ready(f"{model}_stream"))
        except InferenceServerException:
            return False

    def model_for(self, request: GenerationRequest) -> str:
        """The public model a request goes to: the pipeline's ``txt2img`` (``model``), or with ``init_image`` its
        ``img2img`` (``img2img`` beside ``txt2img``, ``NAME_img2img`` beside ``NAME``).
        """
        if request.init_image is None:
            return self.model
        return "img2img" if self.model == "txt2img" else f"{self.model}_img2img"

    def generate(self, request: GenerationRequest | None = None, **fields: Any) -> np.ndarray | list[np.ndarray]:
        """Generate: the image (``[H, W, 3]`` uint8), or the list of ``num_images`` images when that is above 1.
        Pass a :class:`GenerationRequest` or its fields as keywords; with ``init_image`` (``strength``,
        ``mask_image``) it goes to ``img2img``.
        """
        if request is None:
            request = GenerationRequest(**fields)
        result = self.run(request)
        return result.image if request.num_images == 1 else list(result.images)

    def run(self, request: GenerationRequest | None = None, **fields: Any) -> GenerationResult:
        """Like :meth:`generate`, returning the :class:`GenerationResult` (``images``, ``LORA_LANDED_STEP``)."""
        if request is None:
            request = GenerationRequest(**fields)
        try:
            result = self._client.infer(
                self.model_for(request),
                build_inputs(request),
                outputs=[grpcclient.InferRequestedOutput(n) for n in ("IMAGES", "LORA_LANDED_STEP")],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            _raise_typed(exc)
        return GenerationResult(result.as_numpy("IMAGES"), _scalar(result, "LORA_LANDED_STEP"))

    def stream(
        self, request: GenerationRequest | None = None, preview_every: int = 0, **fields: Any
    ) -> Iterator[Progress | GenerationResult]:
        """Generate through ``<model>_stream``: yields a :class:`Progress` per step, then the
        :class:`GenerationResult` (the same image as :meth:`run`). Leaving the loop early (``break``, an exception,
        closing the iterator) closes the stream, which cancels the generation on the server.
        """
        if request is None:
            request = GenerationRequest(**fields)
        inputs = build_inputs(request)
        every = grpcclient.InferInput("PREVIEW_EVERY", [1], "INT32")
        every.set_data_from_numpy(np.array([preview_every], dtype=np.int32))
        events: queue.Queue[Any] = queue.Queue()
        self._client.start_stream(
            callback=lambda result, error: events.put(error if error is not None else result),
            stream_timeout=self.timeout_s,
        )
        finished = False
        try:
            self._client.async_stream_infer(f"{self.model_for(request)}_stream", [*inputs, every])
            while True:
                event = events.get()
                if isinstance(event, InferenceServerException):
                    _raise_typed(event)
                images = event.as_numpy("IMAGES")
                if images is not None:
                    finished = True
                    yield GenerationResult(images, _scalar(event, "LORA_LANDED_STEP"))
                    return
                yield Progress(_scalar(event, "STEP"), _scalar(event, "TOTAL_STEPS"), event.as_numpy("PREVIEW"))
        finally:
            self._client.stop_stream(cancel_requests=not finished)

    def infer_raw(self, inputs: dict[str, np.ndarray], model: str | None = None) -> dict[str, np.ndarray]:
        """Send arbitrary tensors (dtype taken from the numpy dtype) — for stage calls and bad-input tests."""
        from tritonclient.utils import np_to_triton_dtype

        tensors = []
        for name, value in inputs.items():
            tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        try:
            result = self._client.infer(model or self.model, tensors, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            _raise_typed(exc)
        response = result.get_response()
        return {out.name: result.as_numpy(out.name) for out in response.outputs}
