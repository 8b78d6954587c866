"""The device bundle (``scripts/prepare_device_bundle.py``): pins, wheel repacking, and the real build for CPython
3.12 — its resolution from the bundle alone (no index) and its size budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from triton_backend.tools import bundle


def test_pins_are_the_tested_versions_without_torch():
    pins = bundle.pinned_closure()
    names = {bundle._name(p) for p in pins}
    assert "numpy==1.26.4" in pins and "protobuf==4.25.9" in pins and "tritonclient==2.51.0" in pins
    assert {"diffusers", "transformers", "peft", "accelerate", "grpcio", "pytest", "setuptools"} <= names
    assert not names & {"torch", "nvidia-pytriton", "triton", "sympy", "ruff", "mypy"}
    assert all("==" in p for p in pins if bundle._name(p) not in ("setuptools", "wheel"))


def test_repack_stores_and_drops_members_with_their_record_lines(tmp_path):
    wheel = tmp_path / "tritonclient-2.51.0-py3-none-manylinux1_x86_64.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("tritonclient/__init__.py", "x = 1\n")
        z.writestr("tritonclient-2.51.0.data/data/bin/perf_analyzer", b"\0" * 1000)
        z.writestr(
            "tritonclient-2.51.0.dist-info/RECORD",
            "tritonclient/__init__.py,,\ntritonclient-2.51.0.data/data/bin/perf_analyzer,,\n",
        )
    bundle.repack(wheel)
    with zipfile.ZipFile(wheel) as z:
        assert z.namelist() == ["tritonclient/__init__.py", "tritonclient-2.51.0.dist-info/RECORD"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        assert "perf_analyzer" not in z.read("tritonclient-2.51.0.dist-info/RECORD").decode()


@pytest.mark.integration
def test_bundle_for_python_312_resolves_alone_and_fits(tmp_path):
    """Downloads from the package registry (as the README's preparation step does): ~90 MB, a few minutes."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "prepare_device_bundle.py"
    run = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    print(json.dumps({k: v for k, v in manifest.items() if k != "pins"}, indent=1))
    assert manifest["python"] == "3.12" and manifest["archive_bytes"] <= bundle.BUDGET_BYTES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.tar.xz", "manifest.json"]  # (all that travels)
    with tarfile.open(tmp_path / "bundle.tar.xz") as tarball:
        names = set(tarball.getnames())
    wheels = {Path(n).name for n in names if n.startswith("bundle/wheels/")}
    assert any(w.startswith("numpy-1.26.4-cp312") for w in wheels)
    assert any(w.startswith("grpcio-") and "cp312" in w for w in wheels)
    tree = "bundle/tritonserver/pytriton/tritonserver"
    assert f"{tree}/python_backend_stubs/3.12/triton_python_backend_stub" in names
    assert f"{tree}/bin/tritonserver" in names
    if manifest["libpython"]:  # (where this machine has a shared libpython3.12: the stub's fallback)
        assert "bundle/libpython/libpython3.12.so.1.0" in names
