"""Triton model ``lora_manager``: a thin shell; the logic is ``triton_backend.triton_models.LoraManagerModel``."""

from triton_backend.triton_models import LoraManagerModel


class TritonPythonModel(LoraManagerModel):
    """See :class:`triton_backend.triton_models.LoraManagerModel` for the tensors."""
