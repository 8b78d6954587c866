"""Triton model ``denoise``: a thin shell; the logic is ``triton_backend.triton_models.DenoiseModel``."""

from triton_backend.triton_models import DenoiseModel


class TritonPythonModel(DenoiseModel):
    """See :class:`triton_backend.triton_models.DenoiseModel` for the tensors."""
