"""Triton model ``controlnet``: a thin shell; the logic is ``triton_backend.controlnet.model.ControlNetModel``."""

from triton_backend.serving.process import prepare

prepare(leave_out=("transformers", "peft", "scipy", "torch._dynamo"))  # before torch loads; see serving/process.py

from triton_backend.controlnet.model import ControlNetModel  # noqa: E402 - after prepare


class TritonPythonModel(ControlNetModel):
    """See :class:`triton_backend.controlnet.model.ControlNetModel` for the tensors."""
