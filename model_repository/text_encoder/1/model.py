"""Triton model ``text_encoder``: a thin shell; the logic is ``triton_backend.triton_models.TextEncoderModel``."""

from triton_backend.triton_models import TextEncoderModel


class TritonPythonModel(TextEncoderModel):
    """See :class:`triton_backend.triton_models.TextEncoderModel` for the tensors."""
