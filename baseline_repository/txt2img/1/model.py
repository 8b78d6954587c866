"""Baseline ``txt2img``: a thin shell; the logic is ``triton_backend.serving.models.BaselineModel``."""

from triton_backend.serving.models import BaselineModel


class TritonPythonModel(BaselineModel):
    """See :class:`triton_backend.serving.models.BaselineModel`."""
