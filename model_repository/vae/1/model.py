"""Triton model ``vae``: a thin shell; the logic is ``triton_backend.triton_models.VaeModel``."""

from triton_backend.triton_models import VaeModel


class TritonPythonModel(VaeModel):
    """See :class:`triton_backend.triton_models.VaeModel` for the tensors."""
