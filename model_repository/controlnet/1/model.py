"""Triton model ``controlnet``: a thin shell; the logic is ``triton_backend.triton_models.ControlNetModel``."""

from triton_backend.triton_models import ControlNetModel


class TritonPythonModel(ControlNetModel):
    """See :class:`triton_backend.triton_models.ControlNetModel` for the tensors."""
