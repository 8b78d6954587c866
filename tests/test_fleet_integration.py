"""A fleet deployment on the real server: a rendered repository with two pipelines (SD and SDXL) next to an
unrelated model, started as stock Triton (``swiftdiffusion tritonserver``, explicit model control, nothing loaded at
start); each pipeline is loaded through the repository API by its public name alone, serves images equal to
diffusers, and one is unloaded while the other keeps serving.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from swiftdiffusion_client import Client, GenerationRequest

from triton_backend.serving.repository import Pipeline, pipeline_models, render
from triton_backend.serving.server import free_port

from .helpers import BIN, assert_same_image

pytestmark = pytest.mark.integration

ECHO_CONFIG = """name: "fleet_echo"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
ECHO_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x * 2)]))
        return out
"""


def echo(client) -> np.ndarray:
    x = grpcclient.InferInput("INPUT0", [3], "FP32")
    x.set_data_from_numpy(np.arange(3, dtype=np.float32))
    return client.infer("fleet_echo", [x]).as_numpy("OUTPUT0")


@pytest.fixture(scope="module")
def fleet(model_dir, sdxl_model_dir, tmp_path_factory):
    repo = tmp_path_factory.mktemp("fleet")
    (repo / "fleet_echo" / "1").mkdir(parents=True)
    (repo / "fleet_echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "fleet_echo" / "1" / "model.py").write_text(ECHO_MODEL)
    render(repo, [Pipeline("sd", model_dir), Pipeline("xl", sdxl_model_dir)])
    grpc = free_port()
    log = open(repo.parent / "fleet.log", "wb")  # noqa: SIM115 - closed below
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWIFTDIFFUSION_")}
    ports = [f"--grpc-port={grpc}", f"--http-port={free_port()}", f"--metrics-port={free_port()}"]
    proc = subprocess.Popen(
        [str(BIN), "tritonserver", f"--model-repository={repo}", "--model-control-mode=explicit", *ports],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"127.0.0.1:{grpc}"
    client = grpcclient.InferenceServerClient(url)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if client.is_server_live():
                break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    yield url, client
    client.close()
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def test_two_pipelines_load_by_name_serve_like_diffusers_and_unload_alone(fleet, reference, sdxl_reference):
    url, client = fleet
    assert [m.name for m in client.get_model_repository_index().models if m.state == "READY"] == []
    client.load_model("fleet_echo")
    np.testing.assert_array_equal(echo(client), [0, 2, 4])

    client.load_model("sd", client_timeout=600)  # the public name alone: Triton loads the ensemble's steps,
    client.load_model("xl", client_timeout=600)  # the stages load what they call over BLS (load_stages)
    for name in ("sd", "xl"):
        for public in ("stream", "img2img", "img2img_stream"):  # each its own public model: NAME_stream, ...
            client.load_model(f"{name}_{public}", client_timeout=600)
        assert all(client.is_model_ready(m) for m in pipeline_models(name)), name
    req = GenerationRequest(prompt="a lighthouse", seed=4, steps=3)
    with Client(url, model="sd", timeout_s=120) as sd, Client(url, model="xl", timeout_s=120) as xl:
        assert_same_image(sd.generate(req), reference(req))
        assert_same_image(xl.generate(req), sdxl_reference(req))
        *_, streamed = xl.stream(req)
        assert np.array_equal(streamed.image, xl.generate(req))
        assert sd.run(dataclasses.replace(req, init_image=np.zeros((64, 64, 3), np.uint8))).images.shape == (
            1,
            64,
            64,
            3,
        )

        errors: list[Exception] = []
        stop = threading.Event()

        def keep_generating() -> None:
            with Client(url, model="sd", timeout_s=120) as c:
                while not stop.is_set():
                    try:
                        c.generate(GenerationRequest(prompt="still here", steps=2))
                    except Exception as exc:  # noqa: BLE001 - collected, asserted below
                        errors.append(exc)

        thread = threading.Thread(target=keep_generating)
        thread.start()
        try:
            for name in pipeline_models("xl"):  # the public model first: no new xl request gets in
                client.unload_model(name)
            deadline = time.monotonic() + 60
            while any(client.is_model_ready(m) for m in pipeline_models("xl")) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            stop.set()
            thread.join(120)
        assert not errors, errors[:3]
        assert not any(client.is_model_ready(m) for m in pipeline_models("xl"))
        assert_same_image(sd.generate(req), reference(req))
    np.testing.assert_array_equal(echo(client), [0, 2, 4])  # the fleet's own model was never touched
