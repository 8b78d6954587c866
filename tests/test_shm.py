"""Shared-memory ownership (:mod:`triton_backend.shm`): a dead owner's files are swept, a live owner's never."""

from __future__ import annotations

import os
import time

from triton_backend import shm

LIVE = "swiftdiffusion_0123456789_"
DEAD = "swiftdiffusion_abcdefabcd_"


def server_files(root, prefix: str) -> list:
    """What a server leaves: Python-backend regions, its lock, a tagged LoRA directory with its own lock."""
    regions = [root / f"{prefix}region_{i}" for i in range(2)]
    for r in regions:
        r.write_bytes(b"x")
    lora = root / f"{shm.STAGE_DIR_PREFIXES[0]}{prefix}q1w2"
    lora.mkdir()
    (lora / "a.safetensors").write_bytes(b"x")
    return [*regions, lora]


def test_sweep_removes_a_dead_servers_files_and_keeps_a_live_ones(tmp_path):
    live = server_files(tmp_path, LIVE)
    dead = server_files(tmp_path, DEAD)
    live_fd = shm.hold(tmp_path / f"{LIVE}owner")
    live_dir_fd = shm.hold(live[-1] / shm.OWNER_FILE)
    os.close(shm.hold(tmp_path / f"{DEAD}owner"))  # its owner died: nobody holds the lock any more
    os.close(shm.hold(dead[-1] / shm.OWNER_FILE))
    try:
        removed = shm.sweep(tmp_path)
        assert all(p.exists() for p in live) and (tmp_path / f"{LIVE}owner").exists()
        assert not any(p.exists() for p in dead) and not (tmp_path / f"{DEAD}owner").exists()
        assert set(removed) == {*dead, tmp_path / f"{DEAD}owner"}
    finally:
        os.close(live_fd)
        os.close(live_dir_fd)
    shm.sweep(tmp_path)  # now the "live" one is dead too
    assert list(tmp_path.iterdir()) == []


def test_a_group_waits_for_its_stage_directories_owners(tmp_path):
    """The server's lock is free but a stub of it still runs (it exits within a second of its server)."""
    files = server_files(tmp_path, DEAD)
    os.close(shm.hold(tmp_path / f"{DEAD}owner"))
    stub_fd = shm.hold(files[-1] / shm.OWNER_FILE)
    try:
        assert shm.sweep(tmp_path) == []
    finally:
        os.close(stub_fd)
    assert len(shm.sweep(tmp_path)) == 4


def test_untagged_stage_directories(tmp_path):
    """Directories made under a plain tritonserver carry only their own lock; a fresh one without it is kept."""
    held = tmp_path / f"{shm.STAGE_DIR_PREFIXES[1]}aaaa"
    dead = tmp_path / f"{shm.STAGE_DIR_PREFIXES[1]}bbbb"
    new = tmp_path / f"{shm.STAGE_DIR_PREFIXES[0]}cccc"
    old = tmp_path / f"{shm.STAGE_DIR_PREFIXES[0]}dddd"
    unrelated = tmp_path / "someone-elses-region"
    for d in (held, dead, new, old):
        d.mkdir()
    unrelated.write_bytes(b"x")
    fd = shm.hold(held / shm.OWNER_FILE)
    os.close(shm.hold(dead / shm.OWNER_FILE))
    past = time.time() - shm.UNLOCKED_GRACE_S - 5
    os.utime(old, (past, past))
    try:
        assert sorted(shm.sweep(tmp_path)) == sorted([dead, old])
        assert held.exists() and new.exists() and unrelated.exists()
    finally:
        os.close(fd)


def test_stage_dir_is_tagged_locked_and_sweeps_first(tmp_path, monkeypatch):
    monkeypatch.setattr(shm, "SHM_DIR", tmp_path)
    monkeypatch.setenv(shm.SHM_TAG_ENV, LIVE)
    stale = tmp_path / f"{shm.STAGE_DIR_PREFIXES[0]}zzzz"
    stale.mkdir()
    os.close(shm.hold(stale / shm.OWNER_FILE))
    path, fd = shm.stage_dir(shm.STAGE_DIR_PREFIXES[0])
    try:
        assert path.parent == tmp_path and path.name.startswith(shm.STAGE_DIR_PREFIXES[0] + LIVE)
        assert not stale.exists()
        assert not shm.abandoned(path / shm.OWNER_FILE)
    finally:
        os.close(fd)
    assert shm.abandoned(path / shm.OWNER_FILE)
