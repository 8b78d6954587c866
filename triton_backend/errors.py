"""The error hierarchy, and the one place where it is mapped onto Triton error codes."""

from __future__ import annotations

from typing import Any


class SwiftDiffusionError(Exception):
    """Base class; ``code`` names the Triton error code it maps to."""

    code = "INTERNAL"


class InvalidRequestError(SwiftDiffusionError):
    """A request field is missing, has the wrong dtype/shape, or is out of range."""

    code = "INVALID_ARG"

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class NotFoundError(SwiftDiffusionError):
    """An adapter (LoRA, ControlNet) or stage name is unknown; the message lists what exists."""

    code = "NOT_FOUND"

    def __init__(self, field: str, name: str, available: list[str] | tuple[str, ...]):
        self.field = field
        self.name = name
        self.available = sorted(available)
        super().__init__(f"{field}: unknown {name!r}; available: {', '.join(self.available) or '(none)'}")


class CancelledError(SwiftDiffusionError):
    """The client cancelled the request (``request.is_cancelled()``)."""

    code = "CANCELLED"


class StageUnavailableError(SwiftDiffusionError):
    """A downstream Triton model (BLS call) failed or is not loaded."""

    code = "UNAVAILABLE"


class DeadlineExceededError(SwiftDiffusionError):
    """The request cannot finish within its deadline (``DEADLINE_MS``) and the deployment refuses late work.

    Triton has no DEADLINE_EXCEEDED code: it maps to ``UNAVAILABLE`` and the message says ``deadline exceeded``.
    """

    code = "UNAVAILABLE"

    def __init__(self, reason: str):
        super().__init__(f"deadline exceeded: {reason}")


class RemoteStageError(SwiftDiffusionError):
    """A BLS callee answered with an error: its code (``INVALID_ARG``, ``NOT_FOUND``, ...) and message pass through."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


class ConfigError(SwiftDiffusionError):
    """A ``config.pbtxt`` parameter or a model directory is invalid; raised at load, fails the load."""

    code = "INVALID_ARG"


def to_triton_error(exc: BaseException, pb_utils: Any) -> Any:
    """Map any exception onto a ``pb_utils.TritonError`` with the right code (the only such mapping).

    The message starts with ``[CODE] `` because Triton passes errors of BLS calls back as ``INTERNAL``: the tag
    lets a calling stage (``denoise`` → ``controlnet``) re-raise with the callee's real code.
    """
    codes = pb_utils.TritonError
    if isinstance(exc, SwiftDiffusionError):
        code = getattr(codes, exc.code, codes.INTERNAL)
        return pb_utils.TritonError(f"[{exc.code}] {exc}", code)
    return pb_utils.TritonError(f"[INTERNAL] {type(exc).__name__}: {exc}", codes.INTERNAL)


def parse_error_tag(message: str) -> tuple[str, str]:
    """``"[NOT_FOUND] x: ..."`` → ``("NOT_FOUND", "x: ...")``; untagged messages give ``("", message)``."""
    if message.startswith("[") and "] " in message:
        tag, rest = message[1:].split("] ", 1)
        if tag.isupper():
            return tag, rest
    return "", message
