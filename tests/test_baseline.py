"""The benchmark baseline (stock diffusers in one Triton model) serves the same contract and the same images."""

from __future__ import annotations

import pytest
from swiftdiffusion_client import Client, GenerationRequest, NotFoundError

from .helpers import assert_same_image, diffusers_controlnet_image, diffusers_image, hint_images, start_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def baseline(model_dir, tmp_path_factory):
    from triton_backend.paths import baseline_repository_dir

    srv = start_server(model_dir, tmp_path_factory.mktemp("baseline"), model_repository=baseline_repository_dir())
    with Client(srv.grpc_url, timeout_s=300) as c:
        yield c
    srv.stop()


def test_baseline_plain_lora_and_controlnet_match_diffusers(baseline, reference, model_dir):
    req = GenerationRequest(prompt="a photo of a cat", seed=3, steps=4, scheduler="ddim")
    assert_same_image(baseline.generate(req), reference(req))
    req = GenerationRequest(
        prompt="a cat", seed=2, steps=4, lora_names=("ink_kohya", "pastel_peft"), lora_scales=(0.7, 0.4)
    )
    result = baseline.run(req)
    assert result.lora_landed_step == 0
    assert_same_image(result.image, diffusers_image(reference, req, req.loras))
    req = GenerationRequest(
        prompt="a tree",
        seed=5,
        steps=4,
        controlnet_names=("edges", "depth"),
        controlnet_images=hint_images(2),
        controlnet_scales=(1.0, 0.5),
    )
    assert_same_image(baseline.generate(req), diffusers_controlnet_image(reference, model_dir, req))
    with pytest.raises(NotFoundError):
        baseline.generate(GenerationRequest(prompt="x", steps=2, lora_names=("nope",)))
    assert_same_image(
        baseline.generate(GenerationRequest(prompt="x", steps=2)), reference(GenerationRequest(prompt="x", steps=2))
    )


def test_baseline_takes_img2img_inputs_the_stock_way(baseline, model_dir):
    """With ``INIT_IMAGE`` the baseline's one model runs the stock img2img / inpainting pipeline (its ``txt2img``
    takes both contracts); ``NUM_IMAGES`` is ``num_images_per_prompt`` with one generator.
    """
    from .test_img2img import diffusers_image as diffusers_img2img
    from .test_img2img import mask_image, request

    for req in (request(strength=0.6), request(mask_image=mask_image())):
        out = baseline.infer_raw(req.to_tensors())
        assert_same_image(out["IMAGE"], diffusers_img2img(model_dir, req))
    out = baseline.infer_raw(request(strength=0.6, num_images=2).to_tensors())
    assert out["IMAGES"].shape == (2, 64, 64, 3)
