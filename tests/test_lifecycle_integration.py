"""Server lifecycle on the real server: drain on stop, a quick idle exit, no orphans when the launcher is killed,
what a SIGKILLed server left in /dev/shm swept by the next start without touching a live server's files, and a
load that fails naming the bad parameter.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from swiftdiffusion_client import Client, ClientError, GenerationRequest

from triton_backend import shm
from triton_backend.serving.watchdog import stub_processes

from .helpers import alive, assert_same_image, children, full_request, start_serve, start_server

pytestmark = pytest.mark.integration


def owned_by(prefix: str) -> list:
    return [p for p in shm.SHM_DIR.iterdir() if prefix in p.name]


def test_stop_drains_requests_in_flight_and_refuses_new_ones(model_dir, local, tmp_path):
    srv = start_server(model_dir, tmp_path)
    long = GenerationRequest(prompt="a long one", steps=40, height=128, width=128)
    expected = local.generate(long).image
    outcome: list[object] = []

    def generate() -> None:
        with Client(srv.grpc_url, timeout_s=120) as c:
            outcome.append(c.generate(long))

    try:
        thread = threading.Thread(target=generate)
        thread.start()
        time.sleep(1.0)  # in flight
        stopper = threading.Thread(target=srv.stop, kwargs={"grace_s": 120})
        stopper.start()
        time.sleep(0.5)
        with Client(srv.grpc_url, timeout_s=30) as c, pytest.raises(ClientError) as refused:
            c.generate(GenerationRequest(prompt="too late", steps=2))
        assert "txt2img" in refused.value.message
        thread.join(120)
        stopper.join(120)
        assert outcome, "the request in flight did not finish"
        assert_same_image(outcome[0], expected)
    finally:
        srv.stop()


def test_an_idle_server_exits_quickly(model_dir, tmp_path):
    srv = start_server(model_dir, tmp_path)
    start = time.monotonic()
    srv.stop(grace_s=30)
    elapsed = time.monotonic() - start
    print(f"idle stop (drain + exit): {elapsed:.2f} s")
    assert elapsed < 6  # about 2.5 s on 2 cores: Triton's 1 s health probe per stub + its 1 s exit poll


def test_a_killed_launcher_takes_its_server_and_stubs_down(model_dir, tmp_path):
    proc, text = start_serve(model_dir, tmp_path, "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0")
    (server_pid,) = children(proc.pid)
    stubs = children(server_pid)
    assert len(stubs) >= 5, text
    proc.kill()  # SIGKILL: no handler runs, as an OOM kill or `timeout -s KILL`
    proc.wait(30)
    deadline = time.monotonic() + 30
    while any(alive(p) for p in [server_pid, *stubs]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(server_pid), "tritonserver outlived the launcher"
    assert not [p for p in stubs if alive(p)], "orphaned stub processes"


def test_a_sigkilled_servers_shared_memory_is_swept_by_the_next_start_not_a_live_ones(model_dir, local, tmp_path):
    req = full_request()  # a LoRA (factor files) and a ControlNet (hint embeddings): every kind of file we make
    expected = local.generate(req).image
    dead = start_server(model_dir, tmp_path / "a", watch_interval=None)
    live = start_server(model_dir, tmp_path / "b")
    try:
        for srv in (dead, live):
            with Client(srv.grpc_url, timeout_s=60) as c:
                assert_same_image(c.generate(req), expected)
        left = owned_by(dead.shm_prefix)
        assert any(p.name.startswith(shm.STAGE_DIR_PREFIXES[0]) for p in left), left  # LoRA factor files
        assert any(p.name.startswith(shm.STAGE_DIR_PREFIXES[1]) for p in left), left  # hint embeddings
        mine = owned_by(live.shm_prefix)

        # The whole server dies at once (tritonserver and every stub) and so does its launcher: nobody cleans up.
        pids = [p for ps in stub_processes(dead.process.pid).values() for p in ps]
        os.killpg(dead.process.pid, signal.SIGKILL)
        dead.process.wait(30)
        os.close(dead._owner_fd)
        dead._owner_fd, dead.process = None, None
        while any(alive(p) for p in pids):
            time.sleep(0.1)
        assert owned_by(dead.shm_prefix), "nothing was left to sweep: the test proves nothing"

        third = start_server(model_dir, tmp_path / "c", watch_interval=None)
        third.stop()
        assert owned_by(dead.shm_prefix) == []
        assert all(p.exists() for p in mine), "a live server's files were touched"
        with Client(live.grpc_url, timeout_s=60) as c:
            assert_same_image(c.generate(req), expected)
    finally:
        dead.stop()
        live.stop()


def test_the_watchdog_leaves_a_model_the_operator_unloaded(model_dir, tmp_path):
    import tritonclient.grpc as grpcclient

    srv = start_server(model_dir, tmp_path, watch_interval=0.5)
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        client.unload_model("vae", headers=srv.admin_headers)
        time.sleep(3)
        assert not client.is_model_ready("vae")
        assert not any(r.model == "vae" for r in srv.watchdog.reloads)
        client.load_model("vae", headers=srv.admin_headers)
        with Client(srv.grpc_url, timeout_s=60) as c:
            assert c.generate(GenerationRequest(prompt="back", steps=2)).shape == (64, 64, 3)
    finally:
        client.close()
        srv.stop()


def test_a_bad_parameter_in_a_hand_edited_repository_fails_the_load_naming_it(model_dir, tmp_path):
    """``serve`` refuses a bad ``--set`` before it starts (test_cli); a repository edited by hand is refused by the
    model's load, with the same line: model, parameter, allowed values.
    """
    from triton_backend.serving.server import ServerError

    from .helpers import render_layout

    repo = render_layout(model_dir, tmp_path / "repo")
    config = repo / "denoise" / "config.pbtxt"
    text = config.read_text()
    default = 'key: "lora_bound_k"\n  value {\n    string_value: "auto"'
    config.write_text(text.replace(default, default.replace("auto", "banana")))
    assert config.read_text() != text
    with pytest.raises(ServerError):
        start_server(model_dir, tmp_path, model_repository=repo, watch_interval=None)
    log = (tmp_path / "server.log").read_text()
    assert "denoise: parameter lora_bound_k='banana'; allowed: auto or an integer >= 0" in log
