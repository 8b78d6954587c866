"""Stage crash recovery on the real server: kill -9 each stage's stub process under traffic; the service is back to
correct images within 30 s without an operator, and a request in flight at the kill gets its own image once the
stage is back (its call retried). Chaos under load, every stage in turn: ``test_chaos_integration.py``.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from swiftdiffusion_client import Client, ClientError, GenerationRequest, Progress

from triton_backend.serving.watchdog import stub_processes

from .helpers import assert_same_image, full_request, start_server

pytestmark = pytest.mark.integration

#: Every stage this request passes through: text_encoder (with a text-encoder LoRA), lora_manager, denoise, unet,
#: controlnet, vae.
STAGES = ("unet", "controlnet", "text_encoder", "vae", "denoise", "lora_manager")


@pytest.fixture(scope="module")
def watched(model_dir, tmp_path_factory):
    """The split layout, where every step is a BLS call to ``unet``: a request passes through every stage. The cpu
    layout, with the UNet in ``denoise``'s process, has its own test (the last one).
    """
    srv = start_server(model_dir, tmp_path_factory.mktemp("recovery"), layout="split", watch_interval=0.5)
    yield srv
    srv.stop()


def kill_stub(srv, stage: str) -> int:
    pid = stub_processes(srv.process.pid)[stage][0]
    os.kill(pid, signal.SIGKILL)
    return pid


def unet_executions(url: str) -> int:
    """Step requests the ``unet`` model has completed so far (Triton's statistics)."""
    c = grpcclient.InferenceServerClient(url)
    try:
        stats = c.get_inference_statistics("unet", as_json=True)["model_stats"][0]["inference_stats"]
    finally:
        c.close()
    return int(stats["success"].get("count", 0))


def served_again_within(url: str, request: GenerationRequest, seconds: float):
    """The first successful image within ``seconds``, and the errors seen before it."""
    errors: list[ClientError] = []
    deadline = time.monotonic() + seconds
    with Client(url, timeout_s=60) as c:
        while time.monotonic() < deadline:
            try:
                return c.generate(request), errors
            except ClientError as exc:
                errors.append(exc)
                time.sleep(0.2)
    raise AssertionError(f"not served within {seconds} s; errors: {[e.message for e in errors][-3:]}")


@pytest.mark.parametrize("stage", STAGES)
def test_a_killed_stage_is_reloaded_and_serves_correct_images_within_30_s(watched, local, stage):
    req = full_request()
    expected = local.generate(req).image  # the same stages in-process (equal to diffusers: test_lora, test_controlnet)
    with Client(watched.grpc_url, timeout_s=60) as c:
        assert_same_image(c.generate(req), expected)  # healthy before
    old = kill_stub(watched, stage)
    start = time.monotonic()
    image, errors = served_again_within(watched.grpc_url, req, 30)
    assert_same_image(image, expected)
    assert time.monotonic() - start < 30
    for exc in errors:  # whatever failed meanwhile said which stage
        assert stage in exc.message or "not healthy" in exc.message, exc.message
    assert any(r.model == stage for r in watched.watchdog.reloads)
    assert old not in stub_processes(watched.process.pid).get(stage, [])


def test_a_request_in_flight_on_a_killed_unet_is_retried_and_gets_its_image(watched):
    outcome: list[object] = []
    slow = GenerationRequest(prompt="a slow one", steps=150, height=256, width=256)

    def long_request() -> None:  # 150 steps at 256x256: several seconds, even on the tiny model
        with Client(watched.grpc_url, timeout_s=120) as c:
            try:
                outcome.append(c.generate(slow))
            except ClientError as exc:
                outcome.append(exc)

    before = unet_executions(watched.grpc_url)
    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.monotonic() + 60
    while unet_executions(watched.grpc_url) < before + 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # kill only once its steps are running: it is in flight, not finished
    assert not outcome, "the request finished before the kill"
    kill_stub(watched, "unet")
    killed_at = time.monotonic()
    thread.join(120)
    assert outcome and isinstance(outcome[0], np.ndarray), outcome  # not an error: the generation was retried
    assert time.monotonic() - killed_at < 30
    with Client(watched.grpc_url, timeout_s=120) as c:
        assert_same_image(outcome[0], c.generate(slow))  # the image it would have had


def test_the_cpu_layout_s_step_process_killed_in_flight_is_retried_and_the_stream_gets_its_image(model_dir, tmp_path):
    """The cpu layout runs the UNet in ``denoise``'s process: killed under a streamed request (its steps under way),
    the stream's steps start again from 1 once ``denoise`` is back, and it ends with the request's own image.
    """
    srv = start_server(model_dir, tmp_path, watch_interval=0.5)
    slow = GenerationRequest(prompt="a slow one", steps=150, height=256, width=256)
    try:
        with Client(srv.grpc_url, timeout_s=120) as c:
            steps, result = [], None
            for event in c.stream(slow):
                if isinstance(event, Progress):
                    steps.append(event.step)
                    if event.step == 3 and steps.count(3) == 1:
                        kill_stub(srv, "denoise")
                else:
                    result = event
            assert result is not None and steps.count(1) == 2, steps[:10]  # (the retried generation's steps)
            assert_same_image(result.image, c.generate(slow))
    finally:
        srv.stop()
