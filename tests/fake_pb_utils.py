"""A stand-in for ``triton_python_backend_utils`` (which exists only inside the Triton stub): just the names
``triton_backend.serving.io`` uses, recording what it is asked to do, so the glue is testable without a server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


class TritonError(Exception):
    INTERNAL, INVALID_ARG, NOT_FOUND, CANCELLED, UNAVAILABLE = range(5)

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


@dataclass
class Tensor:
    name: str
    value: np.ndarray

    def as_numpy(self) -> np.ndarray:
        return self.value

    def is_cpu(self) -> bool:
        return True


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None):
        self.output_tensors, self._error = output_tensors or [], error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def outputs(self) -> dict[str, np.ndarray]:
        return {t.name: t.value for t in self.output_tensors}


@dataclass
class Request:
    """An incoming request: its input tensors."""

    inputs: dict[str, np.ndarray]
    cancelled: bool = False
    #: The outputs the client asked for (empty: every output).
    wanted: tuple[str, ...] = ()

    def is_cancelled(self) -> bool:
        return self.cancelled

    def requested_output_names(self) -> list[str]:
        return list(self.wanted)


def get_input_tensor_by_name(request: Request, name: str) -> Tensor | None:
    return Tensor(name, request.inputs[name]) if name in request.inputs else None


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors if t.name == name), None)


#: What a BLS call to a model answers: ``model name → function(inputs) -> outputs dict or TritonError``.
MODELS: dict[str, Any] = {}
#: Every BLS request issued, in order: ``(model, input names, sync/async)``.
ISSUED: list[tuple[str, tuple[str, ...], str]] = []


@dataclass
class InferenceRequest:
    model_name: str
    inputs: list[Tensor]
    requested_output_names: list[str]

    def _run(self) -> InferenceResponse:
        out = MODELS[self.model_name]({t.name: t.value for t in self.inputs})
        if isinstance(out, TritonError):
            return InferenceResponse(error=out)
        return InferenceResponse([Tensor(n, v) for n, v in out.items() if n in self.requested_output_names])

    def exec(self) -> InferenceResponse:
        ISSUED.append((self.model_name, tuple(t.name for t in self.inputs), "exec"))
        return self._run()

    async def async_exec(self) -> InferenceResponse:
        ISSUED.append((self.model_name, tuple(t.name for t in self.inputs), "async_exec"))
        return self._run()
