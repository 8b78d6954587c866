"""The progress channel between denoise and txt2img_stream (real abstract Unix sockets, no server)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from triton_backend.errors import CancelledError, InvalidRequestError
from triton_backend.serving.progress import ProgressListener, ProgressSender, preview_every, progress_address


async def collect(listener: ProgressListener, call: asyncio.Future, cancelled=lambda: False) -> list[dict]:
    return [frame async for frame in listener.events(call, cancelled)]


def test_every_step_arrives_in_order_with_its_preview_before_the_answer():
    async def main():
        async with ProgressListener() as listener:
            preview = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)

            async def denoise():
                sender = await ProgressSender.connect(progress_address(np.array([listener.address.encode()], object)))
                for step in range(1, 4):
                    sender.send(step, 3, preview if step == 2 else None)
                await sender.close()
                return "latents"

            call = asyncio.ensure_future(denoise())
            frames = await collect(listener, call)
            assert await call == "latents"
        return frames

    frames = asyncio.run(main())
    assert [(int(f["STEP"][0]), int(f["TOTAL_STEPS"][0]), "PREVIEW" in f) for f in frames] == [
        (1, 3, False),
        (2, 3, True),
        (3, 3, False),
    ]
    assert np.array_equal(frames[1]["PREVIEW"], np.arange(18, dtype=np.uint8).reshape(2, 3, 3))


def test_hanging_up_cancels_the_sender_and_a_gone_stream_refuses_to_connect():
    async def main():
        async with ProgressListener() as listener:
            sender = await ProgressSender.connect(listener.address)
            sender.send(1, 10)
            never = asyncio.get_running_loop().create_future()
            frames = await collect(listener, never, cancelled=lambda: True)  # the client closed its stream
            for _ in range(100):
                if sender.closed:
                    break
                await asyncio.sleep(0.01)
            assert sender.closed and frames == []
            sender.send(2, 10)  # (a step that finishes after the hang-up is dropped, not an error)
            await sender.close()
        with pytest.raises(CancelledError, match="stream"):
            await ProgressSender.connect(listener.address)

    asyncio.run(main())


def test_a_denoise_call_that_fails_before_connecting_ends_the_relay():
    async def main():
        async with ProgressListener() as listener:

            async def refused():
                raise InvalidRequestError("STEPS", "0 is not a step count")

            call = asyncio.ensure_future(refused())
            assert await asyncio.wait_for(collect(listener, call), 5) == []
            with pytest.raises(InvalidRequestError, match="STEPS"):
                await call

    asyncio.run(main())


def test_a_closing_frame_tells_a_deliberate_end_from_a_dead_sender():
    """``denoise`` closes with :data:`END_STEP`; a socket that just ends (its process died) is told apart."""

    async def one(deliberate: bool) -> tuple[bool, int]:
        async with ProgressListener() as listener:
            sender = await ProgressSender.connect(listener.address)
            sender.send(1, 150)
            if deliberate:
                await sender.close()
            else:
                sender._writer.transport.abort()  # what the kernel does to a killed process's socket
            frames = await asyncio.wait_for(collect(listener, asyncio.get_running_loop().create_future()), 5)
            return listener.ended, len(frames)

    assert asyncio.run(one(True)) == (True, 1)
    assert asyncio.run(one(False)) == (False, 1)


@pytest.mark.parametrize("value", [b"", b"/tmp/x", b"swiftdiffusion_progress_../x", b"other_0123456789"])
def test_only_addresses_of_this_module_are_accepted(value):
    with pytest.raises(InvalidRequestError, match="PROGRESS_ADDRESS"):
        progress_address(np.array([value], dtype=object))


def test_preview_every_is_checked_by_name():
    assert preview_every(None) == 0 and preview_every(np.array([3], np.int32)) == 3
    for bad in (np.array([-1], np.int32), np.array([1.5], np.float32), np.array([1, 2], np.int32)):
        with pytest.raises(InvalidRequestError, match="PREVIEW_EVERY"):
            preview_every(bad)
