"""Triton model ``text_encoder``: a thin shell; the logic is ``triton_backend.serving.models.TextEncoderModel``."""

from triton_backend.serving.imports import leave_out

leave_out("peft", "scipy")  # unused here; see triton_backend/serving/imports.py

from triton_backend.serving.models import TextEncoderModel  # noqa: E402 - after leave_out


class TritonPythonModel(TextEncoderModel):
    """See :class:`triton_backend.serving.models.TextEncoderModel` for the tensors."""
