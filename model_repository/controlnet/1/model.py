"""Triton model ``controlnet``: a thin shell; the logic is ``triton_backend.controlnet.model.ControlNetModel``."""

from triton_backend.controlnet.model import ControlNetModel


class TritonPythonModel(ControlNetModel):
    """See :class:`triton_backend.controlnet.model.ControlNetModel` for the tensors."""
