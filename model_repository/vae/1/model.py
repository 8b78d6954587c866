"""Triton model ``vae``: a thin shell; the logic is ``triton_backend.serving.models.VaeModel``."""

from triton_backend.serving.models import VaeModel


class TritonPythonModel(VaeModel):
    """See :class:`triton_backend.serving.models.VaeModel` for the tensors."""
