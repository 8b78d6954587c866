"""Triton model ``lora_manager``: a thin shell; the logic is ``triton_backend.lora.model.LoraManagerModel``."""

from triton_backend.serving.process import prepare

prepare(leave_out=("scipy",))  # before torch loads; see serving/process.py

from triton_backend.lora.model import LoraManagerModel  # noqa: E402 - after prepare


class TritonPythonModel(LoraManagerModel):
    """See :class:`triton_backend.lora.model.LoraManagerModel` for the tensors."""
