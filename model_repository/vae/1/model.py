"""Triton model ``vae``: a thin shell; the logic is ``triton_backend.serving.models.VaeModel``."""

from triton_backend.serving.process import prepare

prepare(leave_out=("transformers", "peft", "scipy", "torch._dynamo"))  # before torch loads; see serving/process.py

from triton_backend.serving.models import VaeModel  # noqa: E402 - after prepare


class TritonPythonModel(VaeModel):
    """See :class:`triton_backend.serving.models.VaeModel` for the tensors."""
