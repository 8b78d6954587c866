"""The progress of one generation, from ``denoise`` to the public model: one Unix socket per request.

``txt2img`` and ``txt2img_stream`` (:mod:`triton_backend.serving.public`) run no model: they call ``text_encoder``,
``denoise`` and ``vae`` over BLS, so streamed and plain generations share one step scheduler. For the per-step
responses of a stream, and to notice a ``denoise`` that died under a request, the public model listens on a socket
in Linux's abstract namespace (no file; it goes away with its listener or its process) and names it in
``denoise``'s optional input ``PROGRESS_ADDRESS``. ``denoise`` connects, writes one frame per step (:data:`FRAME`:
step, total steps, preview height and width, then the preview's RGB bytes) and closes after the last step (or a
failure), with a closing frame (:data:`END_STEP`), before it answers; a socket that ends without that frame ended
with ``denoise``'s process. Closing the socket from the public model's side (the client cancelled) is how
``denoise`` learns that the generation is cancelled: it stops at its next step.
"""

from __future__ import annotations

import asyncio
import os
import re
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from ..errors import CancelledError, InvalidRequestError

#: One step: step number (1-based), total steps, preview height and width (0, 0: no preview); RGB bytes follow.
FRAME = struct.Struct("!iiii")
#: The step number of the frame ``denoise`` writes last, when it closes on purpose (done, failed or cancelled): a
#: socket that ends without it ended with ``denoise``'s process.
END_STEP = -1
#: Abstract socket names ``denoise`` connects to; nothing else (``PROGRESS_ADDRESS`` is a request input).
ADDRESS = re.compile(r"swiftdiffusion_progress_[0-9a-f]{8,64}")
#: How often the stream side checks for a cancelled request while no frame arrives (seconds).
POLL_S = 0.05
#: How long ``denoise`` waits for its last frames to be read before it answers anyway (seconds).
CLOSE_TIMEOUT_S = 5.0


def preview_every(value: np.ndarray | None) -> int:
    """The optional ``PREVIEW_EVERY`` input: INT32 ``[1]``, ``>= 0`` (0 or absent: no previews)."""
    if value is None:
        return 0
    array = np.asarray(value)
    if array.dtype.kind not in "iu" or array.size != 1:
        raise InvalidRequestError("PREVIEW_EVERY", f"expected one INT32, got {array.dtype} {list(array.shape)}")
    every = int(array.reshape(-1)[0])
    if every < 0:
        raise InvalidRequestError("PREVIEW_EVERY", f"{every} is negative; 0 = no previews, N = every N steps")
    return every


def progress_address(value: np.ndarray) -> str:
    """The ``PROGRESS_ADDRESS`` input (BYTES ``[1]``): a name this module made, else the field is refused."""
    array = np.asarray(value).reshape(-1)
    raw = array[0] if array.size == 1 else b""
    name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    if not ADDRESS.fullmatch(name):
        raise InvalidRequestError("PROGRESS_ADDRESS", "expected the address txt2img_stream sends (one string)")
    return name


def encode_frame(step: int, total: int, preview: np.ndarray | None = None) -> bytes:
    """One frame: :data:`FRAME` and, with a preview (``[h, w, 3]`` uint8), its bytes."""
    if preview is None:
        return FRAME.pack(step, total, 0, 0)
    h, w, _ = preview.shape
    return FRAME.pack(step, total, h, w) + np.ascontiguousarray(preview, dtype=np.uint8).tobytes()


class ProgressListener:
    """Stream side: the socket of one request; :meth:`events` yields its frames as ``txt2img_stream`` outputs."""

    def __init__(self) -> None:
        self.address = f"swiftdiffusion_progress_{os.getpid():x}{uuid.uuid4().hex}"
        self.connected = False
        #: ``denoise`` closed on purpose (:data:`END_STEP`): its answer follows. ``False`` once the socket ended
        #: means its process ended.
        self.ended = False
        self._closed = False
        self._frames: asyncio.Queue[dict[str, np.ndarray] | None] = asyncio.Queue()
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> ProgressListener:
        self._server = await asyncio.start_unix_server(self._serve, path="\0" + self.address)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        if self._server is not None:
            self._server.close()

    @property
    def hung_up(self) -> bool:
        """The stream side hung up (:meth:`close`): ``denoise`` cancels at its next step and answers then."""
        return self._closed

    def close(self) -> None:
        """Hang up on ``denoise`` (which then cancels the generation at its next step). The socket keeps listening
        until the context ends: a connection still in the listen backlog is accepted and hung up on as well (a
        listener that closed would leave it unanswered, and ``denoise`` would not learn of the cancellation).
        """
        self._closed = True
        for writer in self._writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connected or self._closed:  # one sender per request, none after the hang-up
            writer.close()
            return
        self.connected = True
        self._writers.append(writer)
        try:
            while True:
                step, total, h, w = FRAME.unpack(await reader.readexactly(FRAME.size))
                if step == END_STEP:
                    self.ended = True
                    break
                out: dict[str, np.ndarray] = {
                    "STEP": np.array([step], np.int32),
                    "TOTAL_STEPS": np.array([total], np.int32),
                }
                if h and w:
                    out["PREVIEW"] = np.frombuffer(await reader.readexactly(h * w * 3), np.uint8).reshape(h, w, 3)
                self._frames.put_nowait(out)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the sender closed: every frame is in
        finally:
            self._frames.put_nowait(None)
            writer.close()

    async def events(
        self,
        call: asyncio.Future[Any],
        cancelled: Callable[[], bool],
        linger_s: float = 10.0,
        poll_s: float = POLL_S,
        gone: Callable[[], bool] | None = None,
    ) -> AsyncIterator[dict[str, np.ndarray]]:
        """The frames until the sender closes. Ends early when ``cancelled()`` (asked every ``poll_s`` while no frame
        arrives; then it hangs up), when ``gone()`` (the sender's process ended before it connected: a request still
        queued in a ``denoise`` that died), or when ``call`` (the ``denoise`` request) failed without connecting;
        after ``call`` succeeded it waits ``linger_s`` at most for the frames still on their way.
        """
        finished_at: float | None = None
        loop = asyncio.get_running_loop()
        getter: asyncio.Future[dict[str, np.ndarray] | None] | None = None
        try:
            while True:
                if cancelled():
                    self.close()
                    return
                getter = getter or asyncio.ensure_future(self._frames.get())
                done, _ = await asyncio.wait({getter, call} if not call.done() else {getter}, timeout=poll_s)
                done.discard(call)
                if not done:
                    if gone is not None and not call.done() and gone():
                        return
                    if call.done():
                        if call.exception() is not None and not self.connected:
                            return
                        finished_at = finished_at or loop.time()
                        if loop.time() - finished_at > linger_s:
                            return
                    continue
                frame, getter = getter.result(), None
                if frame is None:
                    return
                yield frame
        finally:
            if getter is not None:
                getter.cancel()


class ProgressSender:
    """``denoise`` side: writes one frame per step (buffered; a slow reader never blocks the event loop)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, address: str) -> ProgressSender:
        try:
            reader, writer = await asyncio.open_unix_connection(path="\0" + address)
        except OSError:
            raise CancelledError("the stream that asked for this generation is gone") from None
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        """The stream side hung up (its client closed the stream): the generation is cancelled."""
        return self._reader.at_eof() or self._writer.is_closing()

    def send(self, step: int, total: int, preview: np.ndarray | None = None) -> None:
        if not self.closed:
            self._writer.write(encode_frame(step, total, preview))

    async def close(self) -> None:
        """Say so (:data:`END_STEP`), flush what is buffered, then close: the stream side reads every frame before
        ``denoise`` answers.
        """
        if not self.closed:
            self._writer.write(FRAME.pack(END_STEP, 0, 0, 0))
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a stream side that stopped reading must not hold the answer back
            self._writer.transport.abort()
