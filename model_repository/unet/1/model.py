"""Triton model ``unet``: a thin shell; the logic is ``triton_backend.serving.models.UNetModel``."""

from triton_backend.serving.process import prepare

prepare(leave_out=("transformers", "peft", "scipy", "torch._dynamo"))  # before torch loads; see serving/process.py

from triton_backend.serving.models import UNetModel  # noqa: E402 - after prepare


class TritonPythonModel(UNetModel):
    """See :class:`triton_backend.serving.models.UNetModel` for the tensors."""
