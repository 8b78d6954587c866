"""Step 1 of the device check: the machine's facts as JSON on stdout (standard library and torch only).

    python scripts/device/preflight.py BUNDLE_DIR

GPU (``nvidia-smi``), the interpreter, torch and its CUDA, ``/dev/shm`` and disk, pip, and the shared libraries the
bundle's stub for this Python links (``ldd``, with the bundle's libraries and this Python's ``LIBDIR``): a missing
``libpython`` is served from the bundle's copy (``libpython/``); anything else missing fails the step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path


def run(*cmd: str, env: dict | None = None) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, env=env).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"


def main() -> int:
    bundle = Path(sys.argv[1])
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    facts: dict = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "libdir": sysconfig.get_config_var("LIBDIR"),
        "shared_libpython": bool(sysconfig.get_config_var("Py_ENABLE_SHARED")),
        "pip": run(sys.executable, "-m", "pip", "--version"),
        "nvidia_smi": run("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"),
        "dev_shm_bytes": shutil.disk_usage("/dev/shm").total if os.path.isdir("/dev/shm") else 0,
        "work_free_bytes": shutil.disk_usage(bundle.parent).free,
        "cpus": os.cpu_count(),
    }
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["torch_cuda"] = torch.version.cuda
        facts["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001 - a fact to report, not a crash
        facts["torch"] = f"import failed: {exc}"
    try:
        import numpy

        facts["device_numpy"] = numpy.__version__
    except ImportError:
        facts["device_numpy"] = None
    root = bundle / "tritonserver"
    stub = root / "pytriton" / "tritonserver" / "python_backend_stubs" / py / "triton_python_backend_stub"
    facts["stub"] = str(stub) if stub.is_file() else f"missing: the bundle has no stub for Python {py}"
    problems = [] if stub.is_file() else [facts["stub"]]
    if stub.is_file():
        libs = [str(root / "nvidia_pytriton.libs"), facts["libdir"] or ""]
        env = {**os.environ, "LD_LIBRARY_PATH": ":".join([*libs, os.environ.get("LD_LIBRARY_PATH", "")])}
        missing = [line.split()[0] for line in run("ldd", str(stub), env=env).splitlines() if "not found" in line]
        facts["stub_missing_libs"] = missing
        carried = bundle / "libpython" / f"libpython{py}.so.1.0"
        facts["libpython_from"] = "bundle" if f"libpython{py}.so.1.0" in missing else "machine"
        if facts["libpython_from"] == "bundle" and not carried.is_file():
            problems.append(f"libpython{py}.so.1.0: the machine has none and the bundle carries none")
        problems += [f"{lib}: not found" for lib in missing if not lib.startswith("libpython")]
    facts["problems"] = problems
    print(json.dumps(facts, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
