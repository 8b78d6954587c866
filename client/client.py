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
    """What ``txt2img`` returns: the image and the step the LoRAs landed at (-1: no LoRAs)."""

    image: np.ndarray
    lora_landed_step: int = -1


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

    def can_stream(self) -> bool:
        """True when the server serves ``<model>_stream`` (a repository rendered with ``--no-stream`` does not)."""
        try:
            return bool(self._client.is_model_ready(f"{self.model}_stream"))
        except InferenceServerException:
            return False

    def generate(self, request: GenerationRequest | None = None, **fields: Any) -> np.ndarray:
        """Generate one image (``[H, W, 3]`` uint8); pass a :class:`GenerationRequest` or its fields as keywords."""
        return self.run(request, **fields).image

    def run(self, request: GenerationRequest | None = None, **fields: Any) -> GenerationResult:
        """Like :meth:`generate`, also returning ``LORA_LANDED_STEP``."""
        if request is None:
            request = GenerationRequest(**fields)
        try:
            result = self._client.infer(
                self.model,
                build_inputs(request),
                outputs=[grpcclient.InferRequestedOutput("IMAGE"), grpcclient.InferRequestedOutput("LORA_LANDED_STEP")],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            _raise_typed(exc)
        landed = result.as_numpy("LORA_LANDED_STEP")
        return GenerationResult(result.as_numpy("IMAGE"), int(landed.reshape(-1)[0]) if landed is not None else -1)

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
            self._client.async_stream_infer(f"{self.model}_stream", [*inputs, every])
            while True:
                event = events.get()
                if isinstance(event, InferenceServerException):
                    _raise_typed(event)
                image = event.as_numpy("IMAGE")
                if image is not None:
                    finished = True
                    yield GenerationResult(image, _scalar(event, "LORA_LANDED_STEP"))
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
