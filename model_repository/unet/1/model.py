"""Triton model ``unet``: a thin shell; the logic is ``triton_backend.serving.models.UNetModel``."""

from triton_backend.serving.imports import leave_out

leave_out("transformers", "peft", "scipy")  # unused here; see triton_backend/serving/imports.py

from triton_backend.serving.models import UNetModel  # noqa: E402 - after leave_out


class TritonPythonModel(UNetModel):
    """See :class:`triton_backend.serving.models.UNetModel` for the tensors."""
