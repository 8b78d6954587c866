"""Triton model ``txt2img``: a thin shell; the logic is ``triton_backend.serving.public.Txt2ImgModel``."""

from triton_backend.serving.public import Txt2ImgModel


class TritonPythonModel(Txt2ImgModel):
    """See :class:`triton_backend.serving.public.Txt2ImgModel` for the tensors."""
