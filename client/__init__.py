"""SwiftDiffusion gRPC client: ``with Client("127.0.0.1:8001") as c: image = c.generate(GenerationRequest(...))``;
``for event in c.stream(request, preview_every=5)`` for per-step progress and previews.
"""

from triton_backend.schema import GenerationRequest

from .client import (
    Client,
    ClientError,
    GenerationResult,
    InvalidArgumentError,
    NotFoundError,
    Progress,
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
    "Progress",
    "RequestCancelledError",
    "ServerUnavailableError",
]
