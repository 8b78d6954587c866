"""Run the ``tritonserver`` bundled in ``nvidia-pytriton`` on our model repository.

The Python backend stub for this interpreter is copied next to ``libtriton_python.so`` in a backend directory we
own (under the cache dir; the installed package is never modified); ``nvidia_pytriton.libs`` and ``libpython``'s
directory go on ``LD_LIBRARY_PATH``; this interpreter's ``bin`` goes first on ``PATH`` so the stubs
import the same environment.

Lifecycle (docs/operations.md):

- each server gets its own shared-memory prefix and holds its lock (:mod:`~triton_backend.shm`); what it leaves
  under ``/dev/shm`` is removed when it stops, and by the next start if it was killed;
- ``tritonserver`` gets SIGTERM when the process that started it dies (``PR_SET_PDEATHSIG``), so a killed launcher
  (a ``timeout``, an OOM kill) never leaves a server and its stubs behind;
- :meth:`TritonServer.stop` drains first: the public models (those no other model calls) are unloaded, which
  refuses new requests and waits for those in flight, for up to ``grace_s``; then the server gets SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import secrets
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
from typing import Any

from .. import shm
from ..paths import MODEL_DIR_ENV, cache_dir, default_model_dir, model_repository_dir
from .watchdog import StageWatchdog, public_models, stub_processes

#: Seconds ``stop`` lets requests in flight finish before it stops the server (``serve --grace``).
DEFAULT_GRACE_S = 30.0
#: Triton APIs that only a client with the admin key may call (gRPC protocols and HTTP APIs alike): loading and
#: unloading models, registering shared memory the server would read, tracing and logging settings.
RESTRICTED_APIS = "model-repository,shared-memory,trace,logging"
#: The HTTP header that carries the admin key; over gRPC Triton expects it as :data:`GRPC_ADMIN_HEADER`.
ADMIN_HEADER = "swiftdiffusion-admin-key"
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"


class ServerError(RuntimeError):
    """The server failed to start, exited early or did not become ready in time."""


#: A ``tritonserver`` tree laid out like the wheel's (``.../pytriton/tritonserver`` next to ``nvidia_pytriton.libs``)
#: to use instead of the installed ``nvidia-pytriton``: the trimmed copy of the device bundle.
TRITON_ROOT_ENV = "SWIFTDIFFUSION_TRITON_ROOT"


def pytriton_root() -> Path:
    """``$SWIFTDIFFUSION_TRITON_ROOT``, else ``site-packages/pytriton/tritonserver`` of ``nvidia-pytriton``."""
    import importlib.util

    if os.environ.get(TRITON_ROOT_ENV):
        return Path(os.environ[TRITON_ROOT_ENV])
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


def exec_tritonserver(args: list[str]) -> None:
    """Replace this process with the bundled ``tritonserver`` and ``args`` as they are (``swiftdiffusion
    tritonserver``): a stock Triton whose environment holds what any Triton install with our package has — the
    backend directory with the Python backend (added unless ``--backend-directory`` is given), its libraries on
    ``LD_LIBRARY_PATH``, this interpreter and our package importable — and no variable of ours.
    """
    command = [str(pytriton_root() / "bin" / "tritonserver"), *args]
    if not any(a.startswith("--backend-directory") for a in args):
        command.append(f"--backend-directory={backend_dir()}")
    os.execve(command[0], command, server_env(None))


#: Triton's CUDA memory pool per GPU (its default is 64 MB): GPU tensors between stages (ControlNet residuals, by
#: DLPack) go through it. At 512 x 512 in fp16 one ControlNet's residuals for a CFG pair are ~27 MB a step, so three
#: ControlNets already pass 64 MB, and python_backend then falls back to a CUDA IPC handle per tensor.
CUDA_POOL_BYTES = 512 << 20


def cuda_pool_args() -> list[str]:
    """``--cuda-memory-pool-byte-size`` for every GPU this machine shows (``CUDA_VISIBLE_DEVICES`` when set, else
    the NVIDIA driver's ``/proc/driver/nvidia/gpus``; no torch import in the launcher); none without a GPU.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")])
    else:
        gpus = Path("/proc/driver/nvidia/gpus")
        count = len(list(gpus.iterdir())) if gpus.is_dir() else 0
    return [f"--cuda-memory-pool-byte-size={i}:{CUDA_POOL_BYTES}" for i in range(count)]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class TritonServer:
    """A ``tritonserver`` child process; use as a context manager (``with TritonServer(...) as s:``)."""

    model_dir: Path | None = None
    #: The repository to serve; ``None``: the one ``swiftdiffusion serve`` renders for ``model_dir`` on this machine
    #: (``--layout auto``: the cpu layout without a GPU), written to a temporary directory at :meth:`start`.
    model_repository: Path | None = None
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
    #: TLS for gRPC: PEM server certificate and key; this launcher's own clients verify the server with the cert.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Key of the restricted APIs (:data:`RESTRICTED_APIS`), sent as header :data:`ADMIN_HEADER`. Random unless
    #: given: then only this launcher (watchdog, drain) can load or unload models.
    admin_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    #: The descriptor of this server's shared-memory lock (:mod:`~triton_backend.shm`), open while it runs.
    _owner_fd: int | None = None

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
    def admin_headers(self) -> dict[str, str]:
        """The gRPC headers that unlock the restricted APIs (``client.unload_model(name, headers=...)``)."""
        return {GRPC_ADMIN_HEADER: self.admin_key}

    def client(self) -> Any:
        """A ``tritonclient.grpc`` client of this server (over TLS when the server has it)."""
        import tritonclient.grpc as grpcclient

        if self.tls_cert is None:
            return grpcclient.InferenceServerClient(self.grpc_url)
        return grpcclient.InferenceServerClient(self.grpc_url, ssl=True, root_certificates=str(self.tls_cert))

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
            f"--grpc-restricted-protocol={RESTRICTED_APIS}:{ADMIN_HEADER}={self.admin_key}",
            f"--http-restricted-api={RESTRICTED_APIS}:{ADMIN_HEADER}={self.admin_key}",
            *self._tls_args(),
            *cuda_pool_args(),
            *self.extra_args,
        ]

    def _tls_args(self) -> list[str]:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ServerError("TLS needs both a certificate and its key (tls_cert, tls_key)")
        if self.tls_cert is None or self.tls_key is None:
            return []
        for path in (self.tls_cert, self.tls_key):
            if not Path(path).is_file():
                raise ServerError(f"TLS file {path} does not exist")
        return ["--grpc-use-ssl=true", f"--grpc-server-cert={self.tls_cert}", f"--grpc-server-key={self.tls_key}"]

    def start(self, timeout: float = 300.0) -> TritonServer:
        """Start the server and block until it is ready (all models loaded) or raise ``ServerError``."""
        if self.model_repository is None:
            self.model_repository = self._render_for_this_machine()
        for name in ("grpc_port", "http_port", "metrics_port"):
            if not getattr(self, name):
                setattr(self, name, free_port(self._client_host))
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115 - closed with the process
        shm.sweep()  # what servers killed earlier left behind (never a live server's files)
        if shm.SHM_DIR.is_dir():
            self._owner_fd = shm.hold(shm.SHM_DIR / f"{self.shm_prefix}owner")
        self.process = subprocess.Popen(
            self.command(),
            env={**server_env(self.model_dir), shm.SHM_TAG_ENV: self.shm_prefix, **self.env},
            stdout=out or None,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            pass_fds=() if self._owner_fd is None else (self._owner_fd,),
            preexec_fn=_terminate_with_parent(),
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        if self.watch_interval:
            self.watchdog = StageWatchdog(
                self.process.pid, self.client, self.admin_headers, self.watch_interval
            ).start()
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.client()
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

    def stop(self, grace_s: float = 0.0, timeout: float = 60.0) -> None:
        """Drain for up to ``grace_s`` (see the module docstring), SIGTERM, wait, else kill the process group."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        proc = self.process
        if proc is not None and proc.poll() is None and grace_s > 0:
            self.drain(grace_s)
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
        shm.remove_prefix(self.shm_prefix)
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None

    def drain(self, grace_s: float) -> list[str]:
        """Unload the public models and wait up to ``grace_s`` for their requests in flight; returns their names.

        Unloading refuses new requests at once (``UNAVAILABLE``); Triton finishes the unload when the last request
        in flight on the model has its response. The stages they call stay loaded meanwhile, so generations in
        flight run to the end. Triton's own SIGTERM handling cannot do this: it stops every model at once, and a
        generation's next step (a new request to ``unet``) is refused.
        """
        deadline = time.monotonic() + grace_s
        client = self.client()
        try:
            names = public_models(client, self.admin_headers)
            for name in names:
                with contextlib.suppress(Exception):
                    client.unload_model(name, headers=self.admin_headers)
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    index = client.get_model_repository_index(headers=self.admin_headers).models
                    states = {m.name: m.state for m in index}
                    if not any(states.get(n) in ("READY", "UNLOADING") for n in names):
                        break
                time.sleep(0.2)
            return names
        except Exception:  # noqa: BLE001 - a server that does not answer is stopped anyway
            return []
        finally:
            client.close()

    def _render_for_this_machine(self) -> Path:
        import atexit
        import tempfile

        from ..tools.default_model import write_default_model
        from .repository import Layout, Pipeline, render, visible_gpus

        model_dir = Path(self.model_dir) if self.model_dir else write_default_model(Path(default_model_dir()))
        out = Path(tempfile.mkdtemp(prefix="swiftdiffusion-repo-"))
        atexit.register(shutil.rmtree, out, True)
        return render(
            out, [Pipeline("txt2img", model_dir)], Layout.auto(visible_gpus()), stage_prefix="", load_stages=False
        )

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


def _terminate_with_parent():
    """A ``preexec_fn``: the child gets SIGTERM when the thread that started it exits (Linux ``prctl``).

    ``prctl`` is looked up before the fork, so the child runs no Python that could take a lock. Elsewhere: ``None``.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    pr_set_pdeathsig = 1

    def child() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return child


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
    README's 1-GPU layout: a second one on the same GPU is a second weight copy time-sliced with the first. In fp16
    (``auto`` on a GPU) ControlNet residuals cross processes in fp16. Untested here (no CUDA): the device check.
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
        if model == "controlnet" and dtype in ("auto", "float16"):  # residuals cross in the stages' fp16
            text = text.replace('{ name: "RESIDUALS" data_type: TYPE_FP32', '{ name: "RESIDUALS" data_type: TYPE_FP16')
        config.write_text(text)
    return dest
