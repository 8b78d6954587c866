"""SwiftDiffusion gRPC client: ``with Client("127.0.0.1:8001") as c: image = c.generate(GenerationRequest(...))``."""

from triton_backend.schema import GenerationRequest

from .client import (
    Client,
    ClientError,
    GenerationResult,
    InvalidArgumentError,
    NotFoundError,
    RequestCancelledError,
    ServerUnavailableError,
)

__all__ = [
    "Client",
    "ClientError",
    "GenerationRequest",
    "GenerationResult",
    "InvalidArgumentError",
    "NotFoundError",
    "RequestCancelledError",
    "ServerUnavailableError",
]
