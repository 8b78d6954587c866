"""Triton model ``txt2img_stream``: a thin shell; the logic is ``triton_backend.serving.stream.StreamModel``."""

from triton_backend.serving.stream import StreamModel


class TritonPythonModel(StreamModel):
    """See :class:`triton_backend.serving.stream.StreamModel` for the tensors."""
