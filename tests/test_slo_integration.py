"""The step scheduler on the real server: deadlines, bursts above capacity, refusal of late work, recovery."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from swiftdiffusion_client import Client, ClientError, GenerationRequest, InvalidArgumentError, ServerUnavailableError

from .helpers import assert_rejected_then_served, assert_same_image, generate_concurrently, start_server

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (np.array([0], dtype=np.int32), "DEADLINE_MS: 0 is out of range"),
        (np.array([-100], dtype=np.int32), "DEADLINE_MS: -100 is out of range"),
        (np.array([2_000_000_000], dtype=np.int32), "DEADLINE_MS: 2000000000 is out of range"),
        (np.array([2.5], dtype=np.float32), "DEADLINE_MS"),
    ],
)
def test_bad_deadline_is_rejected_naming_the_field_and_the_server_keeps_serving(client, reference, value, needle):
    assert_rejected_then_served(client, reference, {"DEADLINE_MS": value}, InvalidArgumentError, needle)


def test_a_request_with_a_deadline_equals_diffusers(client, reference):
    req = GenerationRequest(prompt="a lighthouse", seed=9, steps=3, deadline_ms=60_000)
    assert_same_image(client.generate(req), reference(req))


def test_a_burst_far_above_capacity_is_served_request_by_request(server, reference):
    """50 requests at once: every one answered with its own image (solo result), then the server serves as before."""
    requests = [GenerationRequest(prompt=f"a {i % 5} boat", seed=i % 5, steps=2, deadline_ms=5_000) for i in range(50)]
    images = generate_concurrently(server.grpc_url, requests)
    expected = {req.seed: reference(req) for req in requests[:5]}
    for req, image in zip(requests, images, strict=True):
        assert_same_image(image, expected[req.seed])
    with Client(server.grpc_url, timeout_s=120) as c:
        after = GenerationRequest(prompt="a boat", seed=77, steps=3)
        assert_same_image(c.generate(after), reference(after))


@pytest.fixture(scope="module")
def strict_server(model_dir, tmp_path_factory):
    """A deployment that refuses late work and holds at most 4 generations."""
    overrides = {"denoise": {"late_policy": "reject", "max_pending": "4"}}
    srv = start_server(model_dir, tmp_path_factory.mktemp("strict"), overrides=overrides)
    yield srv
    srv.stop()


def _try(url: str, req: GenerationRequest) -> np.ndarray | ClientError:
    with Client(url, timeout_s=300) as c:
        try:
            return c.generate(req)
        except ClientError as exc:
            return exc


def test_over_max_pending_is_refused_clearly_and_the_rest_are_served(strict_server, reference):
    requests = [GenerationRequest(prompt="a kite", seed=i % 3, steps=6) for i in range(16)]
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: _try(strict_server.grpc_url, r), requests))
    refused = [r for r in results if isinstance(r, ClientError)]
    served = [(req, r) for req, r in zip(requests, results, strict=True) if isinstance(r, np.ndarray)]
    assert served, "nothing was served"
    assert refused, "16 requests at once never exceeded max_pending=4"
    for exc in refused:
        assert isinstance(exc, ServerUnavailableError) and "max_pending" in exc.message, exc
    expected = {req.seed: reference(req) for req in requests[:3]}
    for req, image in served:
        assert_same_image(image, expected[req.seed])


def test_an_impossible_deadline_is_refused_when_the_deployment_rejects_late_work(strict_server, reference):
    with Client(strict_server.grpc_url, timeout_s=120) as c:
        c.generate(GenerationRequest(prompt="warm up", steps=3))  # the scheduler has measured a step now
        with pytest.raises(ServerUnavailableError, match="deadline exceeded"):
            c.generate(GenerationRequest(prompt="a kite", steps=40, deadline_ms=1))
        ok = GenerationRequest(prompt="a kite", seed=3, steps=3, deadline_ms=600_000)
        assert_same_image(c.generate(ok), reference(ok))
