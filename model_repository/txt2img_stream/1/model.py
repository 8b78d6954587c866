"""Triton model ``txt2img_stream``: a thin shell; the logic is ``triton_backend.serving.models.StreamModel``."""

from triton_backend.serving.models import StreamModel


class TritonPythonModel(StreamModel):
    """See :class:`triton_backend.serving.models.StreamModel` for the tensors."""
