"""Triton model ``denoise``: a thin shell; the logic is ``triton_backend.serving.models.DenoiseModel``."""

from triton_backend.serving.models import DenoiseModel


class TritonPythonModel(DenoiseModel):
    """See :class:`triton_backend.serving.models.DenoiseModel` for the tensors."""
