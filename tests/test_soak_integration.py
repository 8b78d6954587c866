"""The soak, short (200 mixed requests) on the real server: no unexpected error, every sampled image equal to its
solo result, no growth in /dev/shm entries or open descriptors. The long run is ``scripts/soak.py``.
"""

from __future__ import annotations

import pytest

from triton_backend.tools.soak import make_jobs, run_soak

from .helpers import start_server

pytestmark = pytest.mark.integration


def test_the_job_mix_covers_every_kind():
    jobs = make_jobs(200)
    kinds = {j.expect for j in jobs}
    assert {"ok", "cancel", "STEPS", "LORA_NAMES", "CONTROLNET_NAMES"} <= kinds
    assert any(j.request.lora_names and j.request.controlnet_names for j in jobs)
    assert len({j.request.scheduler for j in jobs}) > 3 and {j.request.width for j in jobs if j.expect == "ok"} == {
        64,
        96,
        128,
    }


def test_short_soak(model_dir, tmp_path):
    srv = start_server(model_dir, tmp_path)
    try:
        report = run_soak(srv, 200, concurrency=4, sample_every=10)
    finally:
        srv.stop()
    print("\n".join(report.lines()))
    assert not report.unexpected, report.unexpected
    assert report.checked >= 5 and not report.mismatched
    assert report.outcomes["cancelled"] > 0 and sum(v for k, v in report.outcomes.items() if "refused" in k) > 0
    assert report.end.shm_entries <= report.start.shm_entries
    assert sum(report.end.fds.values()) <= sum(report.start.fds.values())
