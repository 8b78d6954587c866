"""Triton model ``unet``: a thin shell; the logic is ``triton_backend.serving.models.UNetModel``."""

from triton_backend.serving.models import UNetModel


class TritonPythonModel(UNetModel):
    """See :class:`triton_backend.serving.models.UNetModel` for the tensors."""
