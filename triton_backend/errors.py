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


class ConfigError(SwiftDiffusionError):
    """A ``config.pbtxt`` parameter or a model directory is invalid; raised at load, fails the load."""

    code = "INVALID_ARG"


def to_triton_error(exc: BaseException, pb_utils: Any) -> Any:
    """Map any exception onto a ``pb_utils.TritonError`` with the right code (the only such mapping)."""
    codes = pb_utils.TritonError
    if isinstance(exc, SwiftDiffusionError):
        code = getattr(codes, exc.code, codes.INTERNAL)
        return pb_utils.TritonError(str(exc), code)
    return pb_utils.TritonError(f"internal error: {type(exc).__name__}: {exc}", codes.INTERNAL)
