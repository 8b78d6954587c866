"""The ControlNet service on another Triton server: a pipeline server calls it over gRPC (``controlnet_url``)
instead of BLS. Images equal the single-server ones; a dead ControlNet server turns ControlNet requests into
``UNAVAILABLE`` naming it while plain requests keep working, and they recover when it returns.
"""

from __future__ import annotations

import shutil
import time

import pytest
from swiftdiffusion_client import Client, GenerationRequest, ServerUnavailableError

from triton_backend.paths import model_repository_dir
from triton_backend.serving.repository import Pipeline, render
from triton_backend.tools.bench import summary, timed

from .helpers import assert_same_image, diffusers_controlnet_image, hint_images, start_server

pytestmark = pytest.mark.integration


def controlnet_only(tmp) -> object:
    repo = tmp / "controlnet-repo"
    shutil.copytree(model_repository_dir() / "controlnet", repo / "controlnet", dirs_exist_ok=True)
    return repo


def median_latency(url: str, req: GenerationRequest, n: int = 5) -> float:
    with Client(url, timeout_s=120) as c:
        return summary(timed(lambda: c.generate(req), n))["median_s"]


def test_controlnet_on_another_server(model_dir, reference, server, tmp_path):
    remote = start_server(model_dir, tmp_path / "cn", model_repository=controlnet_only(tmp_path))
    ports = {"grpc_port": remote.grpc_port, "http_port": remote.http_port, "metrics_port": remote.metrics_port}
    url = remote.grpc_url
    repo = render(  # no local ControlNet service at all: denoise and unet call it by URL
        tmp_path / "pipeline-repo",
        [Pipeline("txt2img", model_dir)],
        stage_prefix="",
        load_stages=False,
        remote={"controlnet": url},
    )
    pipeline = start_server(model_dir, tmp_path / "pipeline", model_repository=repo)
    req = GenerationRequest(
        prompt="a photo of a cat", seed=5, steps=3, controlnet_names=("edges",), controlnet_images=hint_images(1)
    )
    plain = GenerationRequest(prompt="a plain one", seed=1, steps=3)
    try:
        expected = diffusers_controlnet_image(reference, model_dir, req)
        with Client(pipeline.grpc_url, timeout_s=120) as c:
            assert_same_image(c.generate(req), expected)  # hints prepared and used on the remote, by handle
        two, one = median_latency(pipeline.grpc_url, req), median_latency(server.grpc_url, req)
        print(f"1 ControlNet, 3 steps: two servers {two:.3f} s, one server {one:.3f} s ({two - one:+.3f} s)")

        remote.stop()
        with Client(pipeline.grpc_url, timeout_s=120) as c:
            with pytest.raises(ServerUnavailableError, match=rf"controlnet at {url}"):
                c.generate(req)
            assert_same_image(c.generate(plain), reference(plain))  # plain requests never touch it

        remote = start_server(model_dir, tmp_path / "cn2", model_repository=controlnet_only(tmp_path), **ports)
        with Client(pipeline.grpc_url, timeout_s=120) as c:
            deadline = time.monotonic() + 30
            while True:  # the channel reconnects on its own
                try:
                    assert_same_image(c.generate(req), expected)
                    break
                except ServerUnavailableError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
    finally:
        pipeline.stop()
        remote.stop()


def test_an_unreachable_remote_fails_the_load_naming_it(model_dir, tmp_path):
    from triton_backend.serving.server import ServerError, free_port

    url = f"127.0.0.1:{free_port()}"  # nobody listens
    repo = render(
        tmp_path / "repo",
        [Pipeline("txt2img", model_dir)],
        stage_prefix="",
        load_stages=False,
        remote={"controlnet": url},
    )
    with pytest.raises(ServerError):
        start_server(model_dir, tmp_path, model_repository=repo, watch_interval=None)
    log = (tmp_path / "server.log").read_text()
    assert f"remote stage controlnet at {url} is not reachable" in log
