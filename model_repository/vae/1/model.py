"""Triton model ``vae``: a thin shell; the logic is ``triton_backend.serving.models.VaeModel``."""

from triton_backend.serving.imports import leave_out

leave_out("transformers", "peft", "scipy")  # unused here; see triton_backend/serving/imports.py

from triton_backend.serving.models import VaeModel  # noqa: E402 - after leave_out


class TritonPythonModel(VaeModel):
    """See :class:`triton_backend.serving.models.VaeModel` for the tensors."""
