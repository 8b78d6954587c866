"""Setuptools shim; the metadata lives in setup.cfg.

Packages are found here: every ``triton_backend`` sub-package (so a new one cannot be forgotten), plus ``client/``,
which is installed as ``swiftdiffusion_client``, and the model repository templates, shipped as package data
``triton_backend/model_repository`` and ``triton_backend/baseline_repository`` (``package_dir`` in setup.cfg) so that
``pip install`` + ``swiftdiffusion repository`` works without a source checkout. ``find:`` cannot name these.
"""

from setuptools import find_packages, setup

TEMPLATES = ["triton_backend.model_repository", "triton_backend.baseline_repository"]

setup(
    packages=[*find_packages(include=["triton_backend", "triton_backend.*"]), "swiftdiffusion_client", *TEMPLATES],
    package_data={t: ["*/config.pbtxt", "*/1/model.py"] for t in TEMPLATES},
)
