"""Triton model ``lora_manager``: a thin shell; the logic is ``triton_backend.lora.model.LoraManagerModel``."""

from triton_backend.serving.imports import leave_out

leave_out("scipy")  # unused here; see triton_backend/serving/imports.py

from triton_backend.lora.model import LoraManagerModel  # noqa: E402 - after leave_out


class TritonPythonModel(LoraManagerModel):
    """See :class:`triton_backend.lora.model.LoraManagerModel` for the tensors."""
