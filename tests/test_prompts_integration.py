"""Prompts over gRPC on the real tritonserver (cpu layout, its frozen UNet): long and weighted prompts, clip skip
and an embedding added while the server runs equal the stages in process.
"""

from __future__ import annotations

import pytest
import torch
from swiftdiffusion_client import Client, GenerationRequest, InvalidArgumentError

from .helpers import assert_same_image
from .test_prompts import long_prompt

pytestmark = pytest.mark.integration


@pytest.fixture()
def cpu_client(default_server):
    with Client(default_server.grpc_url, timeout_s=120) as c:
        yield c


def test_long_weighted_prompts_and_clip_skip_over_grpc_equal_the_stages_in_process(cpu_client, local):
    for req in (
        GenerationRequest(prompt=long_prompt(local), negative_prompt="(blurry:1.3)", seed=4, steps=4),
        GenerationRequest(prompt="a (red:1.4) house BREAK [blue] sky", seed=4, steps=4, clip_skip=2),
    ):
        assert_same_image(cpu_client.generate(req), local.generate(req).image)
    with pytest.raises(InvalidArgumentError, match="CLIP_SKIP"):
        cpu_client.generate(GenerationRequest(prompt="x", steps=2, clip_skip=13))


def test_an_embedding_added_while_serving_is_used_by_the_next_request(cpu_client, local, model_dir):
    req = GenerationRequest(prompt="a photo of glowtoken", seed=6, steps=4)
    store = model_dir / "embeddings"
    store.mkdir(exist_ok=True)
    dim = local.text_encoder.models[0].get_input_embeddings().weight.shape[1]
    path = store / "glowtoken.pt"
    try:
        torch.save({"string_to_param": {"*": torch.randn(2, dim, generator=torch.Generator().manual_seed(1))}}, path)
        assert_same_image(cpu_client.generate(req), local.generate(req).image)
    finally:
        path.unlink(missing_ok=True)
    assert_same_image(cpu_client.generate(req), local.generate(req).image)  # removed: plain text again
