"""txt2img_stream over gRPC streaming: per-step progress and previews, then the same image as txt2img."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from swiftdiffusion_client import (
    Client,
    GenerationRequest,
    GenerationResult,
    InvalidArgumentError,
    Progress,
)

from .helpers import assert_same_image, full_request

pytestmark = pytest.mark.integration


def collect(client, request, preview_every=0):
    events = list(client.stream(request, preview_every=preview_every))
    *progress, result = events
    assert isinstance(result, GenerationResult) and all(isinstance(e, Progress) for e in progress)
    return progress, result


def test_stream_sends_every_step_then_the_image_of_txt2img(client, reference):
    req = GenerationRequest(prompt="a streamed cat", negative_prompt="blurry", seed=7, steps=6, height=64, width=48)
    progress, result = collect(client, req, preview_every=2)
    assert [(p.step, p.total_steps) for p in progress] == [(i, 6) for i in range(1, 7)]
    previews = {p.step: p.preview for p in progress if p.preview is not None}
    assert sorted(previews) == [2, 4]  # every 2 steps, none at the last step (the image follows)
    for preview in previews.values():
        assert preview.shape == (8, 6, 3) and preview.dtype == np.uint8
    assert not np.array_equal(previews[2], previews[4])
    assert np.array_equal(result.image, client.generate(req))
    assert_same_image(result.image, reference(req))


def test_stream_without_previews_and_with_adapters_equals_txt2img(client):
    req = full_request(seed=3, steps=4)
    progress, result = collect(client, req)
    assert all(p.preview is None for p in progress) and len(progress) == 4
    plain = client.run(req)
    assert np.array_equal(result.image, plain.image)
    assert result.lora_landed_step == plain.lora_landed_step


def test_two_step_evaluation_samplers_count_their_timesteps(client):
    """Heun evaluates the UNet twice per step: TOTAL_STEPS is the number of UNet steps, as diffusers' progress bar."""
    progress, result = collect(client, GenerationRequest(prompt="x", steps=3, scheduler="heun"))
    assert progress[-1].step == progress[-1].total_steps == len(progress) == 5
    assert np.array_equal(result.image, client.generate(GenerationRequest(prompt="x", steps=3, scheduler="heun")))


def unet_executions(client) -> int:
    stats = client._client.get_inference_statistics("unet", as_json=True)
    return sum(int(m.get("execution_count", 0)) for m in stats["model_stats"])


def test_closing_the_stream_cancels_the_generation(server, client):
    req = GenerationRequest(prompt="a long one", steps=150, guidance_scale=1.0)
    before = unet_executions(client)
    started = time.monotonic()
    for event in client.stream(req):
        if isinstance(event, Progress) and event.step >= 3:
            break  # closes the stream
    deadline = time.monotonic() + 30
    last = unet_executions(client)
    while time.monotonic() < deadline:  # wait until the UNet stops being called
        time.sleep(1.0)
        now = unet_executions(client)
        if now == last:
            break
        last = now
    assert last - before < 100, f"{last - before} UNet executions: the generation was not cancelled"
    assert time.monotonic() - started < 60
    assert client.generate(GenerationRequest(prompt="after", steps=2)).shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"preview_every": -1}, "PREVIEW_EVERY"), ({"steps": 0}, "STEPS"), ({"scheduler": "nope"}, "SCHEDULER")],
)
def test_bad_stream_input_names_the_field(client, kwargs, field):
    every = kwargs.pop("preview_every", 0)
    req = GenerationRequest(prompt="x", **kwargs)
    with pytest.raises(InvalidArgumentError, match=field):
        list(client.stream(req, preview_every=every))
    assert len(collect(client, GenerationRequest(prompt="x", steps=2))[0]) == 2


def test_the_cli_progress_bar_and_previews(client, tmp_path):
    from swiftdiffusion_client.cli import stream_with_progress

    bar = io.StringIO()
    req = GenerationRequest(prompt="a bar", steps=20)
    result = stream_with_progress(client, req, tmp_path, show=True, file=bar)
    assert "/20 [" in bar.getvalue() and "step/s" in bar.getvalue()  # tqdm redraws at most every 0.1 s
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step_{i:03d}.png" for i in range(2, 20, 2)]
    assert np.array_equal(result.image, client.generate(req))


def test_can_stream_tells_whether_the_server_has_the_stream_model(server, client):
    assert client.can_stream()
    with Client(server.grpc_url, model="vae") as other:
        assert not other.can_stream()


def test_a_missing_prompt_is_refused_by_name(server):
    with Client(server.grpc_url, timeout_s=60) as c, pytest.raises(InvalidArgumentError, match="PROMPT"):
        list(c.stream(GenerationRequest(prompt="")))
