"""Triton model ``text_encoder``: a thin shell; the logic is ``triton_backend.serving.models.TextEncoderModel``."""

from triton_backend.serving.process import prepare

prepare(leave_out=("peft", "scipy"))  # before torch loads; see serving/process.py

from triton_backend.serving.models import TextEncoderModel  # noqa: E402 - after prepare


class TritonPythonModel(TextEncoderModel):
    """See :class:`triton_backend.serving.models.TextEncoderModel` for the tensors."""
