"""perf_analyzer (tritonclient 2.51.0's binary) runs against our server with the shipped input data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from triton_backend.serving.perf import input_data_dir, perf_analyzer_binary

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent / "swiftdiffusion"


def test_input_data_files_match_the_contract():
    from triton_backend.schema import FIELDS_BY_NAME

    files = sorted(p.name for p in input_data_dir().glob("*.json"))
    assert files == [
        "img2img_0l.json",
        "img2img_1c1l.json",
        "txt2img_0l.json",
        "txt2img_1c.json",
        "txt2img_1c1l.json",
        "txt2img_1l.json",
        "txt2img_2c2l.json",
        "txt2img_2l.json",
        "txt2img_sdxl.json",
    ]
    for name in files:
        for entry in json.loads((input_data_dir() / name).read_text())["data"]:
            assert set(entry) <= set(FIELDS_BY_NAME) and "PROMPT" in entry
            assert ("INIT_IMAGE" in entry) == name.startswith("img2img")


def test_binary_is_found():
    assert perf_analyzer_binary().is_file()


@pytest.mark.parametrize(
    "fixture,data",
    [
        ("server", "txt2img_0l.json"),
        ("server", "txt2img_2l.json"),
        ("server", "txt2img_1c1l.json"),
        ("sdxl_server", "txt2img_sdxl.json"),
        ("default_server", "img2img_0l.json"),
    ],
)
def test_perf_analyzer_reports_successful_requests(request, fixture, data, tmp_path):
    server = request.getfixturevalue(fixture)
    # The test server delays every lora_manager response by 1 s (deterministic LoRA landing), so measure a fixed
    # number of requests rather than a time window.
    out = subprocess.run(
        [
            str(BIN),
            "perf-analyzer",
            "-m",
            data.split("_")[0],
            "-u",
            server.grpc_url,
            "-i",
            "grpc",
            "--input-data",
            str(input_data_dir() / data),
            "--request-count",  # a fixed number of requests: no stabilization loop that noise can fail
            "8",
            "--concurrency-range",
            "2",
            "-f",
            str(tmp_path / "perf.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Throughput:" in out.stdout
    rows = (tmp_path / "perf.csv").read_text().splitlines()
    header, values = rows[0].split(","), rows[1].split(",")
    assert float(values[header.index("Inferences/Second")]) > 0
