"""Run the ``tritonserver`` bundled in ``nvidia-pytriton`` on our model repository.

DESIGN.md §3: the Python backend stub for this interpreter is copied next to ``libtriton_python.so`` in a backend
directory we own (under the cache dir; the installed package is never modified); ``nvidia_pytriton.libs`` and
``libpython``'s directory go on ``LD_LIBRARY_PATH``; this interpreter's ``bin`` goes first on ``PATH`` so the stubs
import the same environment. Each server gets its own shared-memory prefix, and anything left under ``/dev/shm``
with that prefix is removed when the server stops.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..paths import MODEL_DIR_ENV, cache_dir, model_repository_dir
from .watchdog import StageWatchdog, stub_processes

#: Stages put this tag in the names of the shared-memory directories they create, so ``stop`` can remove them.
SHM_TAG_ENV = "SWIFTDIFFUSION_SHM_TAG"


class ServerError(RuntimeError):
    """The server failed to start, exited early or did not become ready in time."""


def pytriton_root() -> Path:
    """``site-packages/pytriton/tritonserver`` of the installed ``nvidia-pytriton``."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed (pip install nvidia-pytriton==0.7.0)")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def pytriton_libs() -> Path:
    """The directory of shared libraries shipped with the ``nvidia-pytriton`` wheel."""
    return pytriton_root().parent.parent / "nvidia_pytriton.libs"


def backend_dir() -> Path:
    """A backend directory of our own: ``python/`` = the bundled backend + the stub for this Python version."""
    root = pytriton_root()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"no Triton Python backend stub for Python {py} in {stub.parent.parent}")
    src = root / "backends" / "python"
    stamp = f"{src.stat().st_mtime_ns}-{stub.stat().st_mtime_ns}"
    target = cache_dir() / "backends" / f"py{py}-{stamp}"
    if not (target / "python" / "triton_python_backend_stub").is_file():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "python").mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(src / name, tmp / "python" / name)
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def server_env(model_dir: Path | None) -> dict[str, str]:
    """The environment ``tritonserver`` and its Python stubs need."""
    env = dict(os.environ)
    libdirs = [str(pytriton_libs()), sysconfig.get_config_var("LIBDIR") or ""]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([d for d in libdirs if d] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_parent, env.get("PYTHONPATH", "")]).rstrip(":")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if model_dir is not None:
        env[MODEL_DIR_ENV] = str(model_dir)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class TritonServer:
    """A ``tritonserver`` child process; use as a context manager (``with TritonServer(...) as s:``)."""

    model_dir: Path | None = None
    model_repository: Path = field(default_factory=model_repository_dir)
    host: str = "127.0.0.1"
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    log_file: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    #: Extra environment for the server and its stubs (e.g. the LoRA manager's test-only delay).
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    #: Reload a model whose stub process died (:mod:`~triton_backend.serving.watchdog`); ``None``: not watched.
    watch_interval: float | None = 1.0
    watchdog: StageWatchdog | None = None
    shm_prefix: str = field(default_factory=lambda: f"swiftdiffusion_{uuid.uuid4().hex[:10]}_")

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def command(self) -> list[str]:
        return [
            str(pytriton_root() / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir()}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--log-verbose=0",
            # Explicit model control: every model loads at start, and the watchdog can reload one whose stub died.
            "--model-control-mode=explicit",
            "--load-model=*",
            *self.extra_args,
        ]

    def start(self, timeout: float = 300.0) -> TritonServer:
        """Start the server and block until it is ready (all models loaded) or raise ``ServerError``."""
        for name in ("grpc_port", "http_port", "metrics_port"):
            if not getattr(self, name):
                setattr(self, name, free_port(self._client_host))
        out = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            self.command(),
            env={**server_env(self.model_dir), SHM_TAG_ENV: self.shm_prefix, **self.env},
            stdout=out or None,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        if self.watch_interval:
            self.watchdog = StageWatchdog(self.process.pid, self.grpc_url, self.watch_interval).start()
        return self

    def _wait_ready(self, timeout: float) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise ServerError(f"tritonserver exited with code {self.process.returncode} before it was ready")
                with contextlib.suppress(Exception):
                    if client.is_server_ready():
                        return
                time.sleep(0.5)
        finally:
            client.close()
        raise ServerError(f"tritonserver not ready after {timeout:.0f}s")

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM, wait for a clean shutdown (it stops the stubs), else kill the whole process group."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        proc = self.process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # any stub that outlived the server
        self.process = None
        # Python-backend regions, and the LoRA/hint caches our stages created under this server's tag.
        for leftover in Path("/dev/shm").glob(f"*{self.shm_prefix}*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    leftover.unlink()

    def memory(self, kind: str = "Rss") -> dict[str, int]:
        """Memory in bytes of ``tritonserver`` itself and of each model's stub processes (summed per model).

        ``kind``: ``"Rss"`` (resident; pages of shared libraries count in every process that maps them) or
        ``"Pss"`` (proportional: a shared page is split between the processes that map it, so the sum is what the
        server really holds), from ``/proc/<pid>/smaps_rollup``.
        """
        if self.process is None:
            return {}
        out = {"tritonserver": _memory_bytes(self.process.pid, kind)}
        for model, pids in stub_processes(self.process.pid).items():
            out[model] = sum(_memory_bytes(pid, kind) for pid in pids)
        return out

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _memory_bytes(pid: int, kind: str) -> int:
    """``Rss`` or ``Pss`` of ``pid`` in bytes (0 once it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(f"{kind}:"):
                return int(line.split()[1]) * 1024
    return 0


def render_repository(
    edits: dict[str, list[tuple[str, str]]], dest: Path | None = None, source: Path | None = None
) -> Path:
    """A copy of the model repository with text edits applied to ``<model>/config.pbtxt`` files.

    Used by benchmarks and device checks to change instance groups, batching or parameters without touching
    the shipped repository, e.g. ``{"unet": [("count: 2", "count: 1")]}``. An edit that matches nothing raises.
    """
    import tempfile

    source = source or model_repository_dir()
    dest = Path(dest or tempfile.mkdtemp(prefix="swiftdiffusion-repo-"))
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
    for model, replacements in edits.items():
        config = dest / model / "config.pbtxt"
        text = config.read_text()
        for old, new in replacements:
            if old not in text:
                raise ValueError(f"{model}/config.pbtxt has no {old!r} to replace")
            text = text.replace(old, new)
        config.write_text(text)
    return dest


#: Stages that run models; on a GPU machine their instance groups become KIND_GPU.
GPU_STAGES = ("text_encoder", "unet", "vae", "controlnet", "txt2img")


def gpu_repository(source: Path | None = None, dtype: str = "auto", unet_instances: int = 1) -> Path:
    """A rendered copy of a repository with its model stages on GPU 0 (``dtype`` for every stage).

    ``denoise`` and ``lora_manager`` stay on the CPU (scheduler math, conversion). One UNet instance, as the
    README's 1-GPU layout: a second one on the same GPU is a second weight copy time-sliced with the first.
    """
    import re

    source = source or model_repository_dir()
    dest = render_repository({}, source=source)
    for model in GPU_STAGES:
        config = dest / model / "config.pbtxt"
        if not config.is_file() or "KIND_CPU" not in config.read_text():
            continue
        text = config.read_text().replace("kind: KIND_CPU", "kind: KIND_GPU gpus: [ 0 ]")
        text = re.sub(r'(key: "dtype" value \{ string_value: ")[^"]*(")', rf"\g<1>{dtype}\g<2>", text)
        if model == "unet":
            text = re.sub(r"count: \d+ kind: KIND_GPU", f"count: {unet_instances} kind: KIND_GPU", text)
        config.write_text(text)
    return dest
