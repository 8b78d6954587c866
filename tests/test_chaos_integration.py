"""No request is lost when a stage dies: chaos under load on the real server.

Steady concurrent traffic with a LoRA and a ControlNet; each stage's process is killed (SIGKILL) in turn while
requests are in flight. Every request ends within 30 s of the kill, with the image it would have had alone (a
generation retried from its first step runs with its own LoRAs, nothing left from the attempt before) or with
``UNAVAILABLE`` naming the stage and saying that a retry is safe: never a hang, never ``INTERNAL``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
from swiftdiffusion_client import Client, ClientError, GenerationRequest

from triton_backend.serving.watchdog import stub_processes

from .helpers import assert_same_image, hint_images, start_server

pytestmark = pytest.mark.integration

#: The stages killed in each layout: every process a request passes through.
KILLS = {"cpu": ("denoise", "vae", "text_encoder", "lora_manager"), "split": ("unet", "controlnet", "denoise")}
#: Requests in flight at each kill, and requests sent right after it (they meet the stage while it is down).
IN_FLIGHT, AFTER = 3, 2
#: Every request ends this soon after the kill.
LIMIT_S = 30.0


def request(seed: int) -> GenerationRequest:
    """~1 s of denoising on the tiny model, through every stage: a text-encoder LoRA patched before the first step
    and a ControlNet."""
    return GenerationRequest(
        prompt="a lighthouse at dusk",
        seed=seed,
        steps=48,
        height=128,
        width=128,
        lora_names=("pastel_peft",),
        lora_bound_k=0,
        controlnet_names=("edges",),
        controlnet_images=hint_images(1, size=128),
    )


@dataclass
class Outcome:
    seed: int
    ended_at: float
    image: np.ndarray | None = None
    error: ClientError | None = None


def send(url: str, seed: int, out: list[Outcome]) -> None:
    with Client(url, timeout_s=120) as c:
        try:
            out.append(Outcome(seed, 0.0, image=c.generate(request(seed))))
        except ClientError as exc:
            out.append(Outcome(seed, 0.0, error=exc))
    out[-1].ended_at = time.monotonic()


@pytest.mark.parametrize("layout", ["cpu", "split"])
def test_every_request_in_flight_at_a_kill_ends_with_its_image_or_a_named_unavailable(model_dir, tmp_path, layout):
    srv = start_server(model_dir, tmp_path, layout=layout, watch_interval=0.5)
    try:
        seeds = range(IN_FLIGHT + AFTER)
        with Client(srv.grpc_url, timeout_s=120) as c:
            solo = {seed: c.generate(request(seed)) for seed in seeds}  # each alone, before any kill
        report = []
        for stage in KILLS[layout]:
            outcomes: list[Outcome] = []
            threads = [threading.Thread(target=send, args=(srv.grpc_url, s, outcomes)) for s in seeds[:IN_FLIGHT]]
            for t in threads:
                t.start()
            time.sleep(0.6)  # in flight: encoded, stepping
            os.kill(stub_processes(srv.process.pid)[stage][0], signal.SIGKILL)
            killed_at = time.monotonic()
            later = [threading.Thread(target=send, args=(srv.grpc_url, s, outcomes)) for s in seeds[IN_FLIGHT:]]
            for t in later:
                t.start()
            for t in threads + later:
                t.join(LIMIT_S + 60)
            assert len(outcomes) == len(seeds), f"{stage}: {len(seeds) - len(outcomes)} request(s) still hang"
            for o in outcomes:
                assert o.ended_at - killed_at < LIMIT_S, f"{stage}: seed {o.seed} ended {o.ended_at - killed_at:.1f} s"
                if o.error is not None:
                    assert o.error.status == "StatusCode.UNAVAILABLE", (stage, o.error)
                    assert stage in o.error.message and "retrying the request is safe" in o.error.message, o.error
                else:
                    assert_same_image(o.image, solo[o.seed])
            recovered = sum(o.image is not None for o in outcomes)
            report.append((stage, recovered, max(o.ended_at for o in outcomes) - killed_at))
            assert recovered >= len(seeds) - 1, (stage, [o.error.message for o in outcomes if o.error])
        print(f"\n{layout}: (stage, images recovered of {len(seeds)}, last end after the kill s): {report}")
    finally:
        srv.stop()
