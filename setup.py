"""Setuptools shim; the metadata lives in setup.cfg.

Packages are found here: every ``triton_backend`` sub-package (so a new one cannot be forgotten), plus ``client/``,
which is installed as ``swiftdiffusion_client`` (``package_dir`` in setup.cfg) and which ``find:`` cannot name.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["triton_backend", "triton_backend.*"]), "swiftdiffusion_client"])
