"""Triton model ``denoise``: a thin shell; the logic is ``triton_backend.serving.models.DenoiseModel``."""

from triton_backend.serving.imports import leave_out

leave_out("transformers", "peft")  # unused here; see triton_backend/serving/imports.py

from triton_backend.serving.models import DenoiseModel  # noqa: E402 - after leave_out


class TritonPythonModel(DenoiseModel):
    """See :class:`triton_backend.serving.models.DenoiseModel` for the tensors."""
