"""Triton model ``img2img``: a thin shell; the logic is ``triton_backend.serving.public.Img2ImgModel``."""

from triton_backend.serving.public import Img2ImgModel


class TritonPythonModel(Img2ImgModel):
    """See :class:`triton_backend.serving.public.Img2ImgModel` for the tensors."""
