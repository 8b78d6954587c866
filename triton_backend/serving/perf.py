"""Run the ``perf_analyzer`` binary shipped in the ``tritonclient`` 2.51.0 wheel (matching the bundled server).

It needs ``libb64.so.0d`` and ``libcudart.so.12``; both ship (under hashed names) in ``nvidia_pytriton.libs``, so
we link them under their sonames in a cache directory of ours and put it on ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..paths import cache_dir
from .server import pytriton_libs

_SONAMES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


def perf_analyzer_binary() -> Path:
    """``perf_analyzer`` from the tritonclient wheel (installed next to this interpreter)."""
    candidate = Path(sys.executable).parent / "perf_analyzer"
    found = candidate if candidate.is_file() else shutil.which("perf_analyzer")
    if not found:
        raise FileNotFoundError("perf_analyzer not found; pip install 'tritonclient[all]==2.51.0'")
    return Path(found)


def perf_analyzer_env() -> dict[str, str]:
    """The environment with a library directory that provides perf_analyzer's missing sonames."""
    libdir = cache_dir() / "perf_analyzer_libs"
    libdir.mkdir(parents=True, exist_ok=True)
    for soname, pattern in _SONAMES.items():
        link = libdir / soname
        if link.exists():
            continue
        matches = sorted(pytriton_libs().glob(pattern))
        if not matches:
            raise FileNotFoundError(f"{pattern} not found in {pytriton_libs()}")
        tmp = libdir / f".{soname}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(matches[0])
        os.replace(tmp, link)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(libdir), env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    return env


def input_data_dir() -> Path:
    """The shipped ``--input-data`` JSON files for ``txt2img`` (one per adapter configuration)."""
    return Path(__file__).resolve().parents[2] / "perf_data"


def run_perf_analyzer(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run perf_analyzer with ``args`` passed through unchanged."""
    return subprocess.run([str(perf_analyzer_binary()), *args], env=perf_analyzer_env(), **kwargs)
