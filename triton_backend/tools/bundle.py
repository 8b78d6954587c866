"""The device bundle: what a CUDA machine without a package registry needs to run SwiftDiffusion, in <= 64 MiB.

The machine has its own Python 3.12 and torch (with its CUDA libraries, numpy 2.x) and nothing else of ours. The
bundle holds:

- ``wheels/``: every distribution the project needs except torch and what torch itself depends on, pinned to the
  versions of the environment that prepared it (the versions CI tests), downloaded for CPython 3.12 manylinux
  x86_64, with ``numpy==1.26.*`` (the bundled Python-backend stub is built against numpy 1.x) and ``protobuf<5``
  (tritonclient 2.51), plus ``setuptools``/``wheel`` so the project installs without build isolation. Wheels are
  re-zipped uncompressed so the archive's xz compresses them (about a third smaller than deflate).
- ``tritonserver/``: a trimmed copy of the ``tritonserver`` bundled in ``nvidia-pytriton`` (its binary, the Python
  backend, the stub for the target Python, and the shared libraries the three link, nothing else), laid out as in
  the wheel: ``pytriton/tritonserver/...`` and ``nvidia_pytriton.libs/``. Point ``SWIFTDIFFUSION_TRITON_ROOT`` at
  ``tritonserver/pytriton/tritonserver`` (see :func:`triton_backend.serving.server.pytriton_root`).
- ``libpython/``: ``libpython3.12.so.1.0`` (stripped, 1.5 MB in the archive) for the stub, which links it. A Python
  built without ``--enable-shared`` (Debian's and Ubuntu's ``python3.12`` without ``libpython3.12t64``) has none;
  the install puts this copy last on ``LD_LIBRARY_PATH``, so the machine's own is used where it has one.
- ``requirements.txt`` (the pins), ``install-nodeps.txt`` (installed without dependencies: they depend on torch)
  and ``manifest.json`` (sizes).

``scripts/prepare_device_bundle.py`` builds it; ``scripts/device/install.sh`` installs it.
"""

from __future__ import annotations

import importlib.metadata as md
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

#: The bundle must fit what a device run may carry.
BUDGET_BYTES = 64 << 20
TARGET_PYTHON = "3.12"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "linux_x86_64")
#: What the project needs at run time (``setup.cfg``'s install_requires less torch and nvidia-pytriton, whose
#: binaries travel trimmed) and for the device check (pytest; the build tools for a no-isolation install).
ROOTS = (
    "diffusers",
    "transformers",
    "peft",
    "safetensors",
    "pillow",
    "tqdm",
    "tritonclient[grpc]",
    "grpcio",
    "pytest",
)
#: Present on the device with torch (torch and its own dependencies), never bundled.
ON_DEVICE = {"torch", "triton", "sympy", "mpmath", "networkx", "jinja2", "markupsafe"}
#: Pins that differ from the preparing environment, whatever it has, and the build tools of a no-isolation install
#: (setuptools >= 70.1 builds wheels itself; ``wheel`` for older pips).
OVERRIDES = {
    "numpy": "numpy==1.26.4",
    "protobuf": "protobuf==4.25.9",
    "setuptools": "setuptools>=70.1,<82",  # (torch 2.11 declares setuptools<82)
    "wheel": "wheel",
}
#: Installed with ``--no-deps``: they declare torch, which pip cannot see on the device's own install.
NO_DEPS = {"peft", "accelerate"}


def pinned_closure(roots: tuple[str, ...] = ROOTS, python: str = TARGET_PYTHON) -> list[str]:
    """``name==version`` of ``roots`` and everything they depend on (markers evaluated for ``python`` on Linux),
    versions from this environment, torch's side left out.
    """
    env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    env |= {"python_version": python, "python_full_version": f"{python}.0"}
    env |= {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    seen: dict[str, str] = {}
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in ON_DEVICE or name in seen:
            continue
        if name in OVERRIDES:
            seen[name] = OVERRIDES[name]
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise RuntimeError(f"{req.name} is not installed: prepare from the project's environment") from None
        seen[name] = f"{name}=={dist.version}"
        for spec in dist.requires or []:
            dep = Requirement(spec)
            extras = req.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate(env | {"extra": e}) for e in extras):
                todo.append(dep)
    for tool, pin in OVERRIDES.items():
        seen.setdefault(tool, pin)
    return sorted(seen.values())


def _name(pin: str) -> str:
    return canonicalize_name(re.split(r"[=<>!~ ]", pin, maxsplit=1)[0])


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def target_args(python: str = TARGET_PYTHON) -> list[str]:
    """Pip options that resolve for CPython ``python`` on manylinux x86_64, binary wheels only."""
    out = ["--python-version", python, "--only-binary=:all:", "--implementation", "cp"]
    for platform in PLATFORMS:
        out += ["--platform", platform]
    return out


def download_wheels(pins: list[str], dest: Path, python: str = TARGET_PYTHON) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    pip("download", "--no-deps", "-q", "-d", str(dest), *target_args(python), *pins)


def dry_run(wheels: Path, pins: list[str], python: str = TARGET_PYTHON) -> None:
    """Resolve the pins for ``python`` from ``wheels`` alone (no index); raises if anything is missing."""
    tmp = wheels.parent / ".dry-run-target"
    common = ["install", "--dry-run", "--ignore-installed", "--no-index", "--find-links", str(wheels), "-q"]
    common += ["--target", str(tmp), *target_args(python)]
    pip(*common, *[p for p in pins if _name(p) not in NO_DEPS])
    pip(*common, "--no-deps", *[p for p in pins if _name(p) in NO_DEPS])
    shutil.rmtree(tmp, ignore_errors=True)


#: Wheel members never used on the device: tritonclient's perf_analyzer binaries and C++ client libraries (40 MB
#: of its 40.6 MB; the device check drives the server from Python).
DROP_MEMBERS = {"tritonclient": ("tritonclient-2.51.0.data/data/",)}
#: Members dropped by pattern: test suites shipped inside wheels.
DROP_PATTERN = re.compile(r"^numpy/(?:.+/)?tests/")


def repack(wheel: Path) -> None:
    """Rewrite ``wheel`` stored (not deflated: the archive's xz compresses better) and without :data:`DROP_MEMBERS`
    (their ``RECORD`` lines go too, so it stays a valid wheel).
    """
    prefixes = DROP_MEMBERS.get(canonicalize_name(wheel.name.split("-")[0]), ())

    def dropped(name: str) -> bool:
        return name.startswith(prefixes) or bool(DROP_PATTERN.match(name))

    buffer = io.BytesIO()
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if dropped(info.filename):
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not dropped(line.split(",", 1)[0])).encode()
            info.compress_type = zipfile.ZIP_STORED
            dst.writestr(info, data)
    wheel.write_bytes(buffer.getvalue())


def linked_libraries(binaries: list[Path], libdir: Path) -> set[Path]:
    """The libraries under ``libdir`` that ``binaries`` load (``ldd``, transitively)."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(libdir)}
    out: set[Path] = set()
    for binary in binaries:
        text = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env).stdout
        for match in re.finditer(r"=>\s+(\S+)", text):
            path = Path(match.group(1))
            if path.parent.resolve() == libdir.resolve():
                out.add(path.resolve())
    return out


def trim_tritonserver(dest: Path, python: str = TARGET_PYTHON) -> None:
    """Copy the binary, the Python backend, the stub for ``python`` and the libraries they link."""
    from ..serving.server import pytriton_libs, pytriton_root

    root, libs = pytriton_root(), pytriton_libs()
    tree = dest / "pytriton" / "tritonserver"
    stub = root / "python_backend_stubs" / python / "triton_python_backend_stub"
    backend = [p for p in sorted((root / "backends" / "python").iterdir()) if p.is_file()]
    parts = [root / "bin" / "tritonserver", *backend, stub]
    for part in parts:
        target = tree / part.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(part, target)
    (dest / libs.name).mkdir(parents=True, exist_ok=True)
    binaries = [root / "bin" / "tritonserver", root / "backends" / "python" / "libtriton_python.so", stub]
    for lib in linked_libraries(binaries, libs):
        if not lib.name.startswith("libpython"):  # (carried apart, in libpython/: the machine's own comes first)
            shutil.copy2(lib, dest / libs.name / lib.name)
    # libtritonserver 31.5 -> 21.6 MB. The CPU rehearsal of the device check runs the trimmed server.
    strip_symbols([tree / "bin" / "tritonserver", *(dest / libs.name).iterdir()])


def strip_symbols(paths: list[Path]) -> None:
    """Symbol tables out of ``paths`` in place (dynamic symbols stay); nothing where there is no ``strip``."""
    strip = shutil.which("strip")
    if strip is None:
        return
    for path in paths:
        subprocess.run([strip, "--strip-unneeded", str(path)], check=True, capture_output=True)


def find_libpython(python: str = TARGET_PYTHON) -> Path | None:
    """A shared ``libpython<python>.so.1.0`` on this machine: of a ``python<python>`` on ``PATH`` built with
    ``--enable-shared``, else of a pyenv-installed one; ``None`` if there is none.
    """
    name = f"libpython{python}.so.1.0"
    candidates: list[Path] = []
    exe = shutil.which(f"python{python}")
    if exe:
        code = "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"
        out = subprocess.run([exe, "-c", code], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()) / name)
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += sorted(pyenv.glob(f"{python}.*/lib/{name}"), reverse=True)
    return next((c for c in candidates if c.is_file()), None)


def compress(tree: Path, archive: Path) -> None:
    """``tree`` as ``archive`` (tar, xz -9); the ``xz`` command uses every core where it exists."""
    xz = shutil.which("xz")
    if xz is None:
        with tarfile.open(archive, "w:xz", preset=9) as tarball:
            tarball.add(tree, arcname=tree.name)
        return
    with archive.open("wb") as sink:
        tar = subprocess.Popen(["tar", "-cf", "-", "-C", str(tree.parent), tree.name], stdout=subprocess.PIPE)
        subprocess.run([xz, "-9", "-T0"], stdin=tar.stdout, stdout=sink, check=True)
        if tar.wait() != 0:
            raise RuntimeError(f"tar of {tree} failed")


def build(out: Path, python: str = TARGET_PYTHON, log=print) -> dict:
    """Build the bundle: ``out`` holds ``bundle.tar.xz`` and ``manifest.json`` only (what travels to the device);
    the unpacked tree is staged in a temporary directory, removed after. Returns the manifest.
    """
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="swiftdiffusion-bundle-") as tmp:
        staging = Path(tmp) / "bundle"
        pins = pinned_closure(python=python)
        log(f"{len(pins)} distributions pinned; downloading wheels for CPython {python} ...")
        download_wheels(pins, staging / "wheels", python)
        dry_run(staging / "wheels", pins, python)
        log("resolution from the bundle alone: ok")
        for wheel in (staging / "wheels").glob("*.whl"):
            repack(wheel)
        trim_tritonserver(staging / "tritonserver", python)
        libpython = find_libpython(python)
        if libpython is None:
            log(f"warning: no shared libpython{python} here: the stub needs the device's own")
        else:
            (staging / "libpython").mkdir()
            copy = staging / "libpython" / libpython.name
            shutil.copy2(libpython, copy)
            strip_symbols([copy])
        (staging / "requirements.txt").write_text("".join(f"{p}\n" for p in pins if _name(p) not in NO_DEPS))
        (staging / "install-nodeps.txt").write_text("".join(f"{p}\n" for p in pins if _name(p) in NO_DEPS))
        archive = out / "bundle.tar.xz"
        log("compressing (xz -9) ...")
        compress(staging, archive)
        sizes = {p.name: p.stat().st_size for p in (staging / "wheels").glob("*.whl")}
        tritonserver = sum(p.stat().st_size for p in (staging / "tritonserver").rglob("*") if p.is_file())
    manifest = {
        "python": python,
        "pins": pins,
        "archive_bytes": archive.stat().st_size,
        "budget_bytes": BUDGET_BYTES,
        "wheels_uncompressed_bytes": sum(sizes.values()),
        "tritonserver_bytes": tritonserver,
        "libpython": str(libpython) if libpython else None,
        "largest_wheels": sorted(sizes.items(), key=lambda kv: -kv[1])[:8],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
