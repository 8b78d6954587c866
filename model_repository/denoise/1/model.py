"""Triton model ``denoise``: a thin shell; the logic is ``triton_backend.serving.models.DenoiseModel``."""

from triton_backend.serving.process import prepare

prepare(leave_out=("transformers", "peft", "torch._dynamo"))  # before torch loads; see serving/process.py

from triton_backend.serving.models import DenoiseModel  # noqa: E402 - after prepare


class TritonPythonModel(DenoiseModel):
    """See :class:`triton_backend.serving.models.DenoiseModel` for the tensors."""
