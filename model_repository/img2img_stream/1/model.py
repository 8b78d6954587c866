"""Triton model ``img2img_stream``: a thin shell; the logic is ``triton_backend.serving.public.Img2ImgStreamModel``."""

from triton_backend.serving.public import Img2ImgStreamModel


class TritonPythonModel(Img2ImgStreamModel):
    """See :class:`triton_backend.serving.public.Img2ImgStreamModel` for the tensors."""
