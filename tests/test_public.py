"""The public models' retry rule (pure): which failures are a stage that is down, and how long a request waits."""

import asyncio

import pytest

from triton_backend.errors import CancelledError, InvalidRequestError, StageUnavailableError
from triton_backend.serving import public
from triton_backend.serving.public import RetryWindow, is_stage_down, with_retries


@pytest.mark.parametrize(
    ("exc", "down"),
    [
        (StageUnavailableError("vae: Stub process 'vae_0_0' is not healthy."), True),
        (StageUnavailableError("denoise: its process ended at step 3 of 150"), True),
        (StageUnavailableError("denoise: [UNAVAILABLE] unet: Stub process 'unet_0_0' is not healthy."), True),
        (StageUnavailableError("vae: Request for unknown model: 'vae' is not found"), True),
        (StageUnavailableError("denoise: deadline exceeded: 3 s left, 5 s of work"), False),
        (StageUnavailableError("denoise: 64 generations pending (max_pending); retry later"), False),
        (InvalidRequestError("STEPS", "0 is out of range"), False),
        (CancelledError("the client cancelled"), False),
    ],
)
def test_only_a_stage_that_is_down_is_retried(exc, down):
    assert is_stage_down(exc) is down


def test_the_window_is_the_deadline_when_there_is_one_else_retry_window_s_after_the_stage_went_down():
    window = RetryWindow(arrival=100.0, retry_window_s=25.0)
    assert window.note_down(110.0) and window.end() == 135.0
    assert window.note_down(130.0) and not window.note_down(134.8)  # (the first time down counts)
    assert RetryWindow(arrival=100.0, retry_window_s=25.0, deadline_ms=5000).end() == 105.0


def test_with_retries_retries_a_down_stage_then_returns_what_it_answered(monkeypatch):
    monkeypatch.setattr(public, "RETRY_PAUSE_S", 0.01)
    answers = [StageUnavailableError("vae: Stub process 'vae_0_0' is not healthy."), "image"]

    async def attempt():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert asyncio.run(with_retries("vae", RetryWindow(0.0, 25.0), attempt)) == "image"
    assert not answers


def test_with_retries_fails_unavailable_naming_the_stage_once_the_window_closes(monkeypatch):
    monkeypatch.setattr(public, "RETRY_PAUSE_S", 0.01)
    calls = []

    async def attempt():
        calls.append(1)
        raise StageUnavailableError("vae: Stub process 'vae_0_0' is not healthy.")

    with pytest.raises(StageUnavailableError) as info:
        asyncio.run(with_retries("vae", RetryWindow(0.0, 0.05), attempt))
    assert str(info.value).startswith("vae: down and not back within the retry window")
    assert "retrying the request is safe" in str(info.value) and info.value.code == "UNAVAILABLE"
    assert len(calls) >= 2


def test_a_refusal_is_not_retried():
    calls = []

    async def attempt():
        calls.append(1)
        raise InvalidRequestError("STEPS", "0 is out of range")

    with pytest.raises(InvalidRequestError):
        asyncio.run(with_retries("denoise", RetryWindow(0.0, 25.0), attempt))
    assert calls == [1]


def test_a_call_whose_stage_died_is_given_up_unless_its_answer_is_on_its_way(monkeypatch):
    """The closing frame of ``denoise`` comes before its answer: a death in between must not leave the call
    waiting forever (Triton never answers it), and an answer that does come still counts.
    """
    monkeypatch.setattr(public, "WATCH_POLL_S", 0.01)
    monkeypatch.setattr(public, "ANSWER_AFTER_HANGUP_S", 0.05)
    alive = [True, True, False]

    async def never_answered():
        call = asyncio.get_running_loop().create_future()
        return await public.until_answered(call, lambda: alive.pop(0) if alive else False, "denoise: it ended")

    with pytest.raises(StageUnavailableError, match="denoise: it ended"):
        asyncio.run(never_answered())
    assert is_stage_down(StageUnavailableError("denoise: its process ended after its last step"))

    async def answered_late():
        call = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.03, call.set_result, "latents")
        return await public.until_answered(call, lambda: False, "denoise: it ended")

    assert asyncio.run(answered_late()) == "latents"
