"""Glue shared by every ``model.py``: reading tensors, answering requests in order, BLS calls, error mapping.

``pb_utils`` (``triton_python_backend_utils``) only exists inside the Triton Python backend stub, so it is passed
in by the caller rather than imported here; this keeps the package importable (and testable) without Triton.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from ..errors import (
    ConfigError,
    RemoteStageError,
    StageUnavailableError,
    SwiftDiffusionError,
    parse_error_tag,
    to_triton_error,
)

#: Tensors by name: numpy arrays in host memory; torch tensors where they stay on a GPU (:func:`output_tensor`).
Tensors = dict[str, Any]
T = TypeVar("T")


def read_tensors(request: Any, names: Iterable[str], pb_utils: Any) -> Tensors:
    """The request's input tensors among ``names`` as numpy arrays; absent optional inputs are left out."""
    out: Tensors = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            out[name] = tensor.as_numpy()
    return out


def output_tensor(name: str, value: Any, pb_utils: Any) -> Any:
    """A ``pb_utils.Tensor``: a numpy array, or a torch tensor in host memory, as numpy; a torch tensor on a GPU by
    DLPack, so it goes to the model that asked for it (a BLS caller on the same server) without a copy through the
    host. The producer synchronizes its stream before (the consumer sees finished values).

    (A host tensor could go by DLPack too, but the CI chaos test once saw ``tritonserver`` abort on a
    ``boost::interprocess::lock_exception`` when the ``controlnet`` stub was killed while answering that way; the
    numpy path never did in any run.)
    """
    if isinstance(value, np.ndarray):
        return pb_utils.Tensor(name, np.ascontiguousarray(value))
    if value.device.type == "cpu":
        return pb_utils.Tensor(name, np.ascontiguousarray(value.numpy()))
    return pb_utils.Tensor.from_dlpack(name, value.contiguous().__dlpack__())


def tensor_value(tensor: Any) -> Any:
    """A received ``pb_utils.Tensor`` as numpy where it is in host memory, else as a torch tensor on its GPU (by
    DLPack: no copy to the host).
    """
    if tensor.is_cpu():
        return tensor.as_numpy()
    from torch.utils.dlpack import from_dlpack

    return from_dlpack(tensor.to_dlpack())


def make_response(outputs: Mapping[str, Any], pb_utils: Any, request: Any = None) -> Any:
    """An ``InferenceResponse`` carrying ``outputs`` (numpy arrays; torch tensors stay on their device).

    With ``request``: only the outputs it asked for. The stub's ``ResponseSender.send`` (which also sends what
    ``execute`` returns) drops the others itself, with the GIL released, and the 3.12 stub crashes
    (SIGSEGV in ``_PyObject_Free`` from ``PbTensor``'s destructor, seen in the device check's rehearsal): the stage
    process dies and its request is lost. (python_backend fixed the destructor in r24.12, PR #390; the bundled
    Triton 2.51 is r24.10.)
    """
    if request is not None:
        wanted = set(request.requested_output_names())
        outputs = {name: value for name, value in outputs.items() if not wanted or name in wanted}
    return pb_utils.InferenceResponse(
        output_tensors=[output_tensor(name, value, pb_utils) for name, value in outputs.items()]
    )


def error_response(exc: BaseException, pb_utils: Any) -> Any:
    """The error response for ``exc``, with its code from :func:`~triton_backend.errors.to_triton_error`."""
    return pb_utils.InferenceResponse(output_tensors=[], error=to_triton_error(exc, pb_utils))


def failure_response(exc: BaseException, pb_utils: Any, logger: Any = None) -> Any:
    """:func:`error_response` for a request that failed; an error that is not ours is logged first."""
    if logger is not None and not isinstance(exc, SwiftDiffusionError):
        logger.log_error(f"unexpected error: {type(exc).__name__}: {exc}")
    return error_response(exc, pb_utils)


def respond_each(requests: Sequence[Any], handle: Callable[[Any], Tensors], pb_utils: Any, logger: Any = None) -> list:
    """One response per request, in order; a failing request gets its own error, the others are still served."""
    responses = []
    for request in requests:
        try:
            responses.append(make_response(handle(request), pb_utils, request))
        except Exception as exc:  # noqa: BLE001 - every failure becomes that request's error response
            responses.append(failure_response(exc, pb_utils, logger))
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
        if isinstance(result, BaseException):
            responses.append(error_response(result, pb_utils))
        else:
            responses.append(make_response(result, pb_utils, requests[i]))
    return responses


#: Threads of a BLS client's executor (started as calls need them). A call given up because its stage's process
#: died keeps its thread while Triton holds the request (a dead stub never answers it), so the pool must outlast
#: many crashes.
BLS_WORKERS = 1024

#: One BLS call: (model name, input tensors, requested output names).
BlsCall = tuple[str, Tensors, Sequence[str]]


class BlsClient:
    """The BLS client of one model instance: an event loop on its own thread (vllm_backend's shape).

    ``pb_utils.InferenceRequest.async_exec`` runs the blocking ``exec`` in the running loop's default executor, so
    the loop gets an executor wide enough for every call in flight (:data:`BLS_WORKERS`). Coroutines (a ``denoise``
    generation, a batch of calls) are handed to the loop with :meth:`submit`; :meth:`infer_many` is for synchronous
    ``execute`` code. Every call is built first, all are awaited together, then every response is checked; a
    failed call raises with the callee's code (``INVALID_ARG``, ``NOT_FOUND``, ``CANCELLED`` pass through, anything
    else is ``UNAVAILABLE`` naming the stage).
    """

    def __init__(
        self,
        pb_utils: Any,
        workers: int = BLS_WORKERS,
        name: str = "bls",
        remotes: dict[str, RemoteStage] | None = None,
    ):
        self.pb = pb_utils
        #: Stages served by another Triton server (by model name): their calls go over gRPC, not BLS.
        self.remotes = remotes or {}
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-exec")
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(self.executor)
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"{name}-loop", daemon=True)
        self.thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coroutine`` on this client's loop; the future is safe to wait on from any other thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on this client's loop thread, waited for (from another thread)."""

        async def call() -> T:
            return fn()

        return self.submit(call()).result()

    async def infer(self, calls: Sequence[BlsCall]) -> list[Tensors]:
        """Issue every call at once (``async_exec``, or gRPC for a remote stage) and wait for all; on this loop."""
        if any(model in self.remotes for model, _, _ in calls):
            return list(await asyncio.gather(*(self._one(call) for call in calls)))
        requests = self._requests(calls)
        responses = await asyncio.gather(*(r.async_exec() for r in requests))
        return self._outputs(calls, responses)

    async def _one(self, call: BlsCall) -> Tensors:
        remote = self.remotes.get(call[0])
        if remote is not None:
            return await remote.infer(*call)
        return self._outputs([call], [await self._requests([call])[0].async_exec()])[0]

    def infer_many(self, calls: Sequence[BlsCall]) -> list[Tensors]:
        """:meth:`infer` from synchronous code; one local call runs directly on the caller's thread."""
        if len(calls) == 1 and calls[0][0] not in self.remotes:
            return self._outputs(calls, [self._requests(calls)[0].exec()])
        return self.submit(self.infer(calls)).result()

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what is still running on the loop, stop it and its executor."""

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.loop.is_running():
            with contextlib.suppress(Exception):
                self.submit(cancel_all()).result(timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _requests(self, calls: Sequence[BlsCall]) -> list[Any]:
        return [
            self.pb.InferenceRequest(
                model_name=model,
                inputs=[self.pb.Tensor(name, np.ascontiguousarray(value)) for name, value in inputs.items()],
                requested_output_names=list(outputs),
            )
            for model, inputs, outputs in calls
        ]

    def _outputs(self, calls: Sequence[BlsCall], responses: Sequence[Any]) -> list[Tensors]:
        results = []
        for (model, _, outputs), response in zip(calls, responses, strict=True):
            if response.has_error():
                # Triton hands BLS errors back with code INTERNAL, so the code travels as the message's "[CODE] " tag.
                code_name, message = parse_error_tag(response.error().message())
                if code_name in ("INVALID_ARG", "NOT_FOUND", "CANCELLED"):
                    raise RemoteStageError(code_name, message)
                raise StageUnavailableError(f"{model}: {message}")
            results.append({name: tensor_value(self.pb.get_output_tensor_by_name(response, name)) for name in outputs})
        return results


class RemoteStage:
    """A stage served by another Triton server (config parameter ``<role>_url``): async gRPC on the BLS loop, one
    channel per URL reused by every call (created on first use, on the loop that awaits it), ``timeout_s`` per call.

    Errors keep BLS's mapping: the remote's ``INVALID_ARG``/``NOT_FOUND`` pass through; anything else (the remote
    is down, slow or failing) is ``UNAVAILABLE`` naming the stage and the URL.
    """

    def __init__(self, url: str, timeout_s: float = 60.0):
        self.url = url
        self.timeout_s = timeout_s
        self._client: Any = None

    def check(self, model: str) -> None:
        """At load: the remote answers and serves ``model`` (else a ``ConfigError`` naming both)."""
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        try:
            ready = client.is_model_ready(model, client_timeout=10)
        except Exception as exc:  # noqa: BLE001 - any failure to reach it is reported as such
            raise ConfigError(f"remote stage {model} at {self.url} is not reachable ({exc})") from None
        finally:
            client.close()
        if not ready:
            raise ConfigError(f"remote stage {model} at {self.url}: the server does not serve it (not ready)")

    async def infer(self, model: str, inputs: Tensors, outputs: Sequence[str]) -> Tensors:
        import tritonclient.grpc as grpcclient
        import tritonclient.grpc.aio as aio
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        if self._client is None:
            self._client = aio.InferenceServerClient(self.url)
        tensors = []
        for name, value in inputs.items():
            array = np.ascontiguousarray(value)
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        wanted = [grpcclient.InferRequestedOutput(name) for name in outputs]
        try:
            result = await self._client.infer(model, tensors, outputs=wanted, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            code_name, message = parse_error_tag(exc.message() or str(exc))
            status = str(exc.status() or "")
            if code_name in ("INVALID_ARG", "NOT_FOUND") or status.endswith(("INVALID_ARGUMENT", "NOT_FOUND")):
                raise RemoteStageError(code_name or status.rsplit(".", 1)[-1], message) from None
            raise StageUnavailableError(f"{model} at {self.url}: {message}") from None
        return {name: result.as_numpy(name) for name in outputs}


def send_final(sender: Any, response: Any, pb_utils: Any) -> None:
    """Send the one response of a request through its ``InferenceResponseSender`` (default mode, Triton >= 24.06)."""
    sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def is_cancelled(request: Any) -> bool:
    """``request.is_cancelled()`` where the backend has it (Triton >= 23.10)."""
    check = getattr(request, "is_cancelled", None)
    return bool(check()) if check is not None else False


#: How often a generation asks the server whether its client cancelled it: each ask is a round trip between the stub
#: and the server (measured: 0.1-0.25 ms), every step otherwise.
CANCEL_POLL_S = 0.05


def cancellation_check(*requests: Any, every_s: float = CANCEL_POLL_S) -> Callable[[], bool]:
    """Whether any of ``requests`` (requests or response senders) was cancelled, asked of the server at most once per
    ``every_s`` (in between: the last answer); the first call always asks.
    """
    asked_at = -math.inf
    cancelled = False

    def check() -> bool:
        nonlocal asked_at, cancelled
        now = time.monotonic()
        if not cancelled and now - asked_at >= every_s:
            asked_at = now
            cancelled = any(is_cancelled(r) for r in requests)
        return cancelled

    return check
