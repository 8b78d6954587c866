"""Triton model ``unet``: a thin shell; the logic is ``triton_backend.triton_models.UNetModel``."""

from triton_backend.triton_models import UNetModel


class TritonPythonModel(UNetModel):
    """See :class:`triton_backend.triton_models.UNetModel` for the tensors."""
