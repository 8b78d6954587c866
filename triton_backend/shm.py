"""What we leave in ``/dev/shm``, who owns it, and removing what a dead owner left.

Every owner holds a shared ``flock`` on a lock file for as long as it lives. The kernel drops a lock when the last
process holding it dies, however it dies (SIGKILL included), so a lock that can be taken exclusively marks the
files of a dead owner:

- a server started by :class:`~triton_backend.serving.server.TritonServer` owns every name that contains its
  prefix ``swiftdiffusion_<10 hex>_`` (the Python backend's regions, and the stage directories below, which carry
  the prefix as their tag); its lock is ``/dev/shm/<prefix>owner``, held by the launcher and passed to
  ``tritonserver`` (so the lock lives while either does);
- a stage directory (LoRA factor files, hint embeddings: :func:`stage_dir`) holds its own lock, ``<dir>/.owner``,
  kept by the stub process that made it, so directories made under a plain ``tritonserver`` are covered too.

:func:`sweep` removes what dead owners left; ``TritonServer.start`` and every stage that makes a directory call it,
and it never touches the files of a live owner (another server, another stage).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import StageUnavailableError

#: Where shared memory lives on Linux; elsewhere the stage directories fall back to the temp dir.
SHM_DIR = Path("/dev/shm")
#: Stages put their server's prefix in the names of the directories they make (set by ``TritonServer``).
SHM_TAG_ENV = "SWIFTDIFFUSION_SHM_TAG"
#: A server's prefix: ``swiftdiffusion_`` + 10 hex digits + ``_``.
SERVER_PREFIX = re.compile(r"swiftdiffusion_[0-9a-f]{10}_")
#: Name prefixes of the directories stages make (:data:`~triton_backend.lora.store.CACHE_DIR_PREFIX`, hints).
STAGE_DIR_PREFIXES = ("swiftdiffusion-lora-", "swiftdiffusion-cn-")
OWNER_FILE = ".owner"
#: A stage directory without a lock file is being made (or predates locks): it is left alone this long.
UNLOCKED_GRACE_S = 60.0


def hold(lock: Path) -> int:
    """Create ``lock`` already locked (shared) and return its descriptor; the lock lasts while it stays open.

    The file is locked under a temporary name and renamed into place, so no :func:`sweep` ever sees it unlocked.
    """
    fd, tmp = tempfile.mkstemp(prefix=".lock-", dir=lock.parent)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.replace(tmp, lock)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd


def abandoned(lock: Path) -> bool:
    """True when nobody holds ``lock`` (or it is gone); False while its owner lives."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def stage_dir(prefix: str) -> tuple[Path, int]:
    """A fresh directory for a stage's shared files (``/dev/shm`` if writable) and the descriptor of its lock.

    Its name is ``prefix`` + the server's tag (:data:`SHM_TAG_ENV`) + random; dead owners' directories are swept
    first. The caller keeps the descriptor open for the directory's life and removes the directory when it closes.
    """
    base = SHM_DIR if SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK) else None
    if base is not None:
        sweep(base)
    path = Path(tempfile.mkdtemp(prefix=prefix + os.environ.get(SHM_TAG_ENV, ""), dir=base))
    return path, hold(path / OWNER_FILE)


def sweep(root: Path = SHM_DIR) -> list[Path]:
    """Remove what dead owners left under ``root``; returns the paths removed."""
    if not root.is_dir():
        return []
    groups: dict[str, list[Path]] = {}
    loose: list[Path] = []
    for path in root.iterdir():
        match = SERVER_PREFIX.search(path.name)
        if match:
            groups.setdefault(match.group(0), []).append(path)
        elif path.name.startswith(STAGE_DIR_PREFIXES) and path.is_dir():
            loose.append(path)
    removed: list[Path] = []
    for prefix, paths in groups.items():
        stage_dirs = [p for p in paths if p.is_dir()]
        if abandoned(root / f"{prefix}owner") and all(_dir_abandoned(d) for d in stage_dirs):
            lock = root / f"{prefix}owner"
            removed += [_remove(p) for p in paths if p != lock]
            if lock in paths:
                removed.append(_remove(lock))
    removed += [_remove(d) for d in loose if _dir_abandoned(d)]
    return removed


def remove_prefix(prefix: str, root: Path = SHM_DIR) -> None:
    """Remove every name under ``root`` that contains ``prefix`` (a server that stopped, by its launcher)."""
    if root.is_dir():
        for path in root.glob(f"*{prefix}*"):
            _remove(path)


def save_tensors(tensors: dict[str, Any], file: Path, stage: str, remedy: str) -> None:
    """Write ``tensors`` to ``file`` (safetensors) whole or not at all.

    A failed write (``/dev/shm`` full) leaves no partial file and raises ``StageUnavailableError`` naming ``stage``
    and ``remedy``: that request fails, the stage keeps serving.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tmp = file.with_name(file.name + ".tmp")
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, file)
    except (OSError, SafetensorError) as exc:  # safetensors reports I/O errors as its own type
        tmp.unlink(missing_ok=True)
        reason = f"cannot write {file.name} to {file.parent} ({getattr(exc, 'strerror', None) or exc}); {remedy}"
        raise StageUnavailableError(f"{stage}: {reason}") from None


def _dir_abandoned(path: Path) -> bool:
    lock = path / OWNER_FILE
    if lock.exists():
        return abandoned(lock)
    with contextlib.suppress(OSError):
        return time.time() - path.stat().st_mtime > UNLOCKED_GRACE_S
    return True


def _remove(path: Path) -> Path:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
    return path
