"""Triton model ``txt2img_stream``: a thin shell; the logic is ``triton_backend.serving.public.StreamModel``."""

from triton_backend.serving.public import StreamModel


class TritonPythonModel(StreamModel):
    """See :class:`triton_backend.serving.public.StreamModel` for the tensors."""
