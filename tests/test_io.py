"""``serving.io``: request bookkeeping, error responses and BLS calls, against a fake ``pb_utils`` (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from triton_backend.errors import (
    InvalidRequestError,
    NotFoundError,
    RemoteStageError,
    StageUnavailableError,
    to_triton_error,
)
from triton_backend.serving import io

from . import fake_pb_utils as pb


def request(**inputs):
    return pb.Request({k: np.asarray(v) for k, v in inputs.items()})


def test_read_tensors_leaves_absent_optional_inputs_out():
    got = io.read_tensors(request(A=[1], B=[2.0]), ("A", "C"), pb)
    assert list(got) == ["A"] and got["A"].tolist() == [1]


def test_a_response_carries_only_the_outputs_its_request_asked_for():
    """The stub would drop the others in ResponseSender.send with the GIL released: the 3.12 stub crashed there."""
    asked = pb.Request({}, wanted=("IMAGES",))
    response = io.make_response({"IMAGES": np.zeros(2), "IMAGE": np.ones(1)}, pb, asked)
    assert list(response.outputs()) == ["IMAGES"]
    assert list(io.make_response({"A": np.zeros(1), "B": np.zeros(1)}, pb, request()).outputs()) == ["A", "B"]


def test_a_host_torch_tensor_leaves_and_arrives_as_numpy():
    import torch

    tensor = io.output_tensor("RESIDUALS", torch.arange(6.0).reshape(2, 3), pb)
    value = io.tensor_value(tensor)
    assert isinstance(value, np.ndarray) and value.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_respond_each_answers_in_order_and_a_failure_fails_alone():
    def handle(r):
        if r.inputs["X"][0] < 0:
            raise InvalidRequestError("X", "must be >= 0")
        return {"Y": r.inputs["X"] * 2}

    out = io.respond_each([request(X=[1]), request(X=[-1]), request(X=[3])], handle, pb)
    assert [r.has_error() for r in out] == [False, True, False]
    assert out[0].outputs()["Y"].tolist() == [2] and out[2].outputs()["Y"].tolist() == [6]
    assert (
        out[1].error().code() == pb.TritonError.INVALID_ARG
        and out[1].error().message() == "[INVALID_ARG] X: must be >= 0"
    )


def test_respond_each_tags_unexpected_exceptions_internal_and_logs_them():
    logged = []

    class Logger:
        def log_error(self, message):
            logged.append(message)

    out = io.respond_each([request(X=[1])], lambda r: 1 / 0, pb, Logger())
    assert out[0].error().code() == pb.TritonError.INTERNAL
    assert out[0].error().message().startswith("[INTERNAL] ZeroDivisionError")
    assert logged and "ZeroDivisionError" in logged[0]


def test_respond_batched_parses_alone_and_computes_the_valid_requests_together():
    batches = []

    def parse(r):
        if "X" not in r.inputs:
            raise InvalidRequestError("X", "is required")
        return int(r.inputs["X"][0])

    def compute_many(items):
        batches.append(items)
        return [{"Y": np.array([i + 1])} for i in items]

    out = io.respond_batched([request(X=[1]), request(), request(X=[5])], parse, compute_many, pb)
    assert batches == [[1, 5]]
    assert [r.has_error() for r in out] == [False, True, False]
    assert out[0].outputs()["Y"].tolist() == [2] and out[2].outputs()["Y"].tolist() == [6]
    assert "X: is required" in out[1].error().message()


def test_respond_batched_per_item_exception_fails_only_that_request():
    out = io.respond_batched(
        [request(X=[1]), request(X=[2])],
        lambda r: int(r.inputs["X"][0]),
        lambda items: [NotFoundError("LORA_NAMES", "x", ["a"]), {"Y": np.array([2])}],
        pb,
    )
    assert out[0].error().code() == pb.TritonError.NOT_FOUND and not out[1].has_error()


def test_respond_batched_whole_batch_failure_keeps_each_parse_error():
    def compute_many(items):
        raise RuntimeError("device lost")

    out = io.respond_batched(
        [request(X=[1]), request()],
        lambda r: (_ for _ in ()).throw(InvalidRequestError("X", "is required")) if "X" not in r.inputs else 1,
        compute_many,
        pb,
    )
    assert "RuntimeError: device lost" in out[0].error().message()
    assert "X: is required" in out[1].error().message()


def test_respond_batched_with_no_valid_request_computes_nothing():
    def compute_many(items):
        raise AssertionError("must not be called")

    out = io.respond_batched(
        [request()], lambda r: (_ for _ in ()).throw(InvalidRequestError("X", "bad")), compute_many, pb
    )
    assert out[0].has_error()


@pytest.fixture()
def models():
    pb.MODELS.clear()
    pb.ISSUED.clear()
    yield pb.MODELS
    pb.MODELS.clear()


@pytest.fixture()
def bls():
    client = io.BlsClient(pb, name="test")
    yield client
    client.close()


def test_bls_one_call_is_synchronous_several_are_gathered(models, bls):
    models["double"] = lambda t: {"Y": t["X"] * 2, "Z": t["X"]}
    (one,) = bls.infer_many([("double", {"X": np.array([1])}, ["Y"])])
    assert list(one) == ["Y"] and one["Y"].tolist() == [2]
    assert pb.ISSUED == [("double", ("X",), "exec")]
    many = bls.infer_many([("double", {"X": np.array([i])}, ["Y"]) for i in range(3)])
    assert [m["Y"].tolist() for m in many] == [[0], [2], [4]]
    assert [kind for *_, kind in pb.ISSUED[1:]] == ["async_exec"] * 3


@pytest.mark.parametrize("code", ["INVALID_ARG", "NOT_FOUND", "CANCELLED"])
def test_bls_error_keeps_the_callees_code_through_the_tag(models, bls, code):
    error = {"INVALID_ARG": InvalidRequestError("STEPS", "bad"), "NOT_FOUND": NotFoundError("LORA_NAMES", "x", [])}
    exc = error.get(code)
    models["callee"] = lambda t: to_triton_error(exc, pb) if exc else pb.TritonError(f"[{code}] stop", 0)
    with pytest.raises(RemoteStageError) as info:
        bls.infer_many([("callee", {"X": np.array([1])}, ["Y"])])
    assert info.value.code == code


def test_bls_other_errors_are_unavailable_naming_the_stage(models, bls):
    models["unet"] = lambda t: pb.TritonError("Stub process 'unet_0' is not healthy.", pb.TritonError.INTERNAL)
    with pytest.raises(StageUnavailableError, match="unet: Stub process"):
        bls.infer_many([("unet", {"X": np.array([1])}, ["Y"])])


def test_is_cancelled():
    assert io.is_cancelled(pb.Request({}, cancelled=True)) and not io.is_cancelled(pb.Request({}))
    assert not io.is_cancelled(object())  # backends before 23.10 have no is_cancelled


def test_bls_client_runs_coroutines_on_its_own_loop_and_close_cancels_them(models, bls):
    import asyncio
    import threading

    models["echo"] = lambda t: {"Y": t["X"]}

    async def work():
        return threading.current_thread().name, await bls.infer([("echo", {"X": np.array([7])}, ["Y"])] * 2)

    name, outs = bls.submit(work()).result(5)
    assert name == "test-loop" and [o["Y"].tolist() for o in outs] == [[7], [7]]
    pending = bls.submit(asyncio.sleep(60))
    bls.close()
    assert pending.cancelled() or isinstance(pending.exception(1), asyncio.CancelledError)


def test_send_final_marks_the_one_response_final():
    sent = []

    class Sender:
        def send(self, response, flags=0):
            sent.append((response, flags))

    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    io.send_final(Sender(), "r", pb)
    assert sent == [("r", 1)]


def test_cancellation_check_asks_the_server_at_most_once_per_interval():
    class Counting:
        asks = 0
        cancelled = False

        def is_cancelled(self) -> bool:
            Counting.asks += 1
            return self.cancelled

    request = Counting()
    check = io.cancellation_check(request, every_s=3600)
    assert not check() and Counting.asks == 1  # the first call always asks
    request.cancelled = True
    assert not check() and Counting.asks == 1  # within the interval: the last answer
    now = io.cancellation_check(request, every_s=0)
    assert now() and now() and Counting.asks == 2  # once cancelled, it stays cancelled without asking again
    sender = pb.Request({}, cancelled=True)
    assert io.cancellation_check(pb.Request({}), sender)()  # any of several (the stream: request and sender)
