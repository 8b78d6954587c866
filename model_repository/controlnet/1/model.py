"""Triton model ``controlnet``: a thin shell; the logic is ``triton_backend.controlnet.model.ControlNetModel``."""

from triton_backend.serving.imports import leave_out

leave_out("transformers", "peft", "scipy")  # unused here; see triton_backend/serving/imports.py

from triton_backend.controlnet.model import ControlNetModel  # noqa: E402 - after leave_out


class TritonPythonModel(ControlNetModel):
    """See :class:`triton_backend.controlnet.model.ControlNetModel` for the tensors."""
