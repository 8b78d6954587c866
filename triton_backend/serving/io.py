"""Glue shared by every ``model.py``: reading tensors, answering requests in order, BLS calls, error mapping.

``pb_utils`` (``triton_python_backend_utils``) only exists inside the Triton Python backend stub, so it is passed
in by the caller rather than imported here; this keeps the package importable (and testable) without Triton.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import RemoteStageError, StageUnavailableError, SwiftDiffusionError, parse_error_tag, to_triton_error

Tensors = dict[str, np.ndarray]


def read_tensors(request: Any, names: Iterable[str], pb_utils: Any) -> Tensors:
    """The request's input tensors among ``names`` as numpy arrays; absent optional inputs are left out."""
    out: Tensors = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            out[name] = tensor.as_numpy()
    return out


def make_response(outputs: Tensors, pb_utils: Any) -> Any:
    """An ``InferenceResponse`` carrying ``outputs`` (contiguous numpy arrays)."""
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in outputs.items()]
    )


def error_response(exc: BaseException, pb_utils: Any) -> Any:
    """The error response for ``exc``, with its code from :func:`~triton_backend.errors.to_triton_error`."""
    return pb_utils.InferenceResponse(output_tensors=[], error=to_triton_error(exc, pb_utils))


def respond_each(requests: Sequence[Any], handle: Callable[[Any], Tensors], pb_utils: Any, logger: Any = None) -> list:
    """One response per request, in order; a failing request gets its own error, the others are still served."""
    responses = []
    for request in requests:
        try:
            responses.append(make_response(handle(request), pb_utils))
        except Exception as exc:  # noqa: BLE001 - every failure becomes that request's error response
            if logger is not None and not isinstance(exc, SwiftDiffusionError):
                logger.log_error(f"unexpected error: {type(exc).__name__}: {exc}")
            responses.append(error_response(exc, pb_utils))
    return responses


def respond_batched(
    requests: Sequence[Any],
    parse: Callable[[Any], Any],
    compute_many: Callable[[list[Any]], Sequence[Tensors | BaseException]],
    pb_utils: Any,
) -> list:
    """Dynamic batching: parse each request alone (a bad one fails alone), compute the valid ones together."""
    parsed: list[Any] = []
    errors: dict[int, BaseException] = {}
    for i, request in enumerate(requests):
        try:
            parsed.append(parse(request))
        except Exception as exc:  # noqa: BLE001
            errors[i] = exc
            parsed.append(None)
    valid = [p for p in parsed if p is not None]
    try:
        results = iter(compute_many(valid) if valid else [])
    except Exception as exc:  # noqa: BLE001 - the whole batch failed: every valid request gets the error
        return [error_response(errors.get(i, exc), pb_utils) for i in range(len(requests))]
    responses = []
    for i in range(len(requests)):
        result = errors.get(i) or next(results)
        # compute_many may return an exception for one item: that request alone fails.
        responses.append(
            error_response(result, pb_utils) if isinstance(result, BaseException) else make_response(result, pb_utils)
        )
    return responses


#: One BLS call: (model name, input tensors, requested output names).
BlsCall = tuple[str, Tensors, Sequence[str]]

_loop: asyncio.AbstractEventLoop | None = None


def bls_infer_many(pb_utils: Any, calls: Sequence[BlsCall]) -> list[Tensors]:
    """Issue every BLS call at once and wait for all (``async_exec`` + ``asyncio.gather``).

    Every ``InferenceRequest`` is built first, all are awaited together, then every response is checked; a
    failed call raises with the callee's code (``INVALID_ARG`` stays an invalid-argument error, anything else
    is ``UNAVAILABLE``). ``execute`` is synchronous here, so a private event loop drives the awaitables.
    """
    global _loop
    requests = [
        pb_utils.InferenceRequest(
            model_name=model,
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in inputs.items()],
            requested_output_names=list(outputs),
        )
        for model, inputs, outputs in calls
    ]
    if len(requests) == 1:
        responses = [requests[0].exec()]
    else:
        if _loop is None:
            _loop = asyncio.new_event_loop()

        async def gather() -> list[Any]:  # async_exec needs a running loop when it is called
            return list(await asyncio.gather(*(r.async_exec() for r in requests)))

        responses = _loop.run_until_complete(gather())
    results = []
    for (model, _, outputs), response in zip(calls, responses, strict=True):
        if response.has_error():
            error = response.error()
            # Triton hands BLS errors back with code INTERNAL, so the code travels as the message's "[CODE] " tag.
            code_name, message = parse_error_tag(error.message())
            if code_name in ("INVALID_ARG", "NOT_FOUND", "CANCELLED"):
                raise RemoteStageError(code_name, message)
            raise StageUnavailableError(f"{model}: {message}")
        results.append({name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs})
    return results


def is_cancelled(request: Any) -> bool:
    """``request.is_cancelled()`` where the backend has it (Triton >= 23.10)."""
    check = getattr(request, "is_cancelled", None)
    return bool(check()) if check is not None else False
