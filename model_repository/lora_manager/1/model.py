"""Triton model ``lora_manager``: a thin shell; the logic is ``triton_backend.lora.model.LoraManagerModel``."""

from triton_backend.lora.model import LoraManagerModel


class TritonPythonModel(LoraManagerModel):
    """See :class:`triton_backend.lora.model.LoraManagerModel` for the tensors."""
