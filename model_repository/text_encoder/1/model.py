"""Triton model ``text_encoder``: a thin shell; the logic is ``triton_backend.serving.models.TextEncoderModel``."""

from triton_backend.serving.models import TextEncoderModel


class TritonPythonModel(TextEncoderModel):
    """See :class:`triton_backend.serving.models.TextEncoderModel` for the tensors."""
