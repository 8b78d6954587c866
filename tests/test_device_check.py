"""``scripts/device_check.sh`` itself (no bundle, no GPU): a step killed at its limit leaves no process behind, a
server-like process in a session of its own included, and what it wrote comes back packed into at most 8 files.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

from .helpers import alive

ROOT = Path(__file__).resolve().parents[1]

#: A step that starts a child in its group, a process in a session of its own (as ``TritonServer`` starts
#: ``tritonserver``), writes a result, then outlives its limit.
SLOW_STEP = """
sleep 300 &
echo $! > "$RESULTS/pids"
setsid sleep 300 &
echo $! >> "$RESULTS/pids"
echo '{"measured": 1}' > "$RESULTS/server.json"
sleep 300
"""


def test_a_step_killed_at_its_limit_leaves_no_process_and_its_results_come_back(tmp_path):
    steps = tmp_path / "steps"
    steps.mkdir()
    (steps / "slow.sh").write_text(SLOW_STEP)
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "STEP_DIR": str(steps), "OUT": str(out), "WORK": str(work), "LIMIT_SLOW": "3"}
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "device_check.sh"), "slow"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    pids = [int(p) for p in (work / "results" / "pids").read_text().split()]
    assert len(pids) == 2
    for pid in pids:
        with_zombie_reaped = not alive(pid) or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        assert with_zombie_reaped, f"process {pid} outlived its step"
    step = json.loads((work / "results" / "steps.jsonl").read_text().splitlines()[-1])
    assert step["timed_out"] and step["limit"] == 3
    files = sorted(p.name for p in out.iterdir())
    assert files == ["results.tar.gz", "server.json", "summary.json"] and all((out / f).is_file() for f in files)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"][0]["step"] == "slow" and summary["server"] == {"measured": 1}
    with tarfile.open(out / "results.tar.gz") as tar:
        assert "results/slow.log" in tar.getnames()


def test_the_cuda_memory_pool_is_sized_for_every_visible_gpu_and_for_none_without_one(monkeypatch):
    from triton_backend.serving.server import CUDA_POOL_BYTES, cuda_pool_args

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert cuda_pool_args() == [f"--cuda-memory-pool-byte-size={i}:{CUDA_POOL_BYTES}" for i in (0, 1)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cuda_pool_args() == []
