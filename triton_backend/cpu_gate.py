"""On a CPU, one stage computes at a time: a lock shared by a server's stage processes (parameter ``cpu_gate``).

Every stage process runs torch with intra-op (OpenMP) threads over the same cores. When two compute at once (the
VAE decode of a finished request under the first UNet step of the next, a text encoder or a LoRA conversion under a
step), their threads spin-wait for each other's cores at every barrier and each runs many times slower than alone:
measured on 2 cores, a UNet encoder half took 257 ms instead of 14 ms under a VAE decode. Taking turns finishes
both sooner. The gate is an exclusive ``flock`` held around each piece of compute, never around a wait for another
stage (so it cannot deadlock), and the kernel releases it when its holder dies, however it dies.

Not chosen: ``OMP_WAIT_POLICY=PASSIVE`` stops the spinning but costs every parallel region a wake-up (measured: a
plain request 0.51 s -> 0.76 s); each stage process keeps a short spin instead (``GOMP_SPINCOUNT``, see
:mod:`triton_backend.serving.process`). Triton's rate limiter (``--rate-limit`` with a global resource) serializes
whole ``execute`` calls, needs a server flag, and hung under load here with our BLS calls (a UNet step that never
ran).

On a GPU the stages overlap on the device and the gate is off (``auto``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .shm import SHM_DIR, SHM_TAG_ENV


def gate_path() -> Path:
    """The lock file: per server (its shared-memory prefix, so ``shm.sweep`` removes it with the server's other
    names), else one per machine for stages under a plain ``tritonserver``.
    """
    base = SHM_DIR if SHM_DIR.is_dir() else Path(tempfile.gettempdir())
    return base / f"{os.environ.get(SHM_TAG_ENV) or 'swiftdiffusion_'}cpu.lock"


class CpuGate:
    """A reentrant, process-wide hold on the lock file: threads of one process take turns too."""

    def __init__(self, path: Path):
        self.path = path
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self._thread_lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            if self._depth == 0:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)


_gate: CpuGate | None = None
_gate_lock = threading.Lock()


def cpu_gate() -> CpuGate:
    """The gate of this process (one per process: every stage object in it shares the hold)."""
    global _gate
    with _gate_lock:
        if _gate is None:
            _gate = CpuGate(gate_path())
        return _gate
