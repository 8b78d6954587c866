"""Baseline ``txt2img``: a thin shell; the logic is ``triton_backend.triton_models.BaselineModel``."""

from triton_backend.triton_models import BaselineModel


class TritonPythonModel(BaselineModel):
    """See :class:`triton_backend.triton_models.BaselineModel`."""
