"""LoRAs through txt2img on the real server: equal to diffusers (k = 0 and landing at j), isolation, bad input."""

from __future__ import annotations

import shutil
import urllib.request

import numpy as np
import pytest
from swiftdiffusion_client import GenerationRequest, InvalidArgumentError, NotFoundError

from .helpers import assert_rejected_then_served, assert_same_image, diffusers_image, generate_concurrently

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name", ["pastel_peft", "ink_kohya", "glow_kohya"])
def test_k0_equals_diffusers_fused(client, reference, name):
    req = GenerationRequest(
        prompt="a photo of a cat", negative_prompt="blurry", seed=2, steps=4, lora_names=(name,), lora_bound_k=0
    )
    result = client.run(req)
    assert result.lora_landed_step == 0
    assert_same_image(result.image, diffusers_image(reference, req, [(name, 1.0)]))


def test_two_loras_with_scales_equal_diffusers(client, reference):
    req = GenerationRequest(
        prompt="a tree", seed=4, steps=4, lora_names=("glow_kohya", "ink_kohya"), lora_scales=(1.5, 0.5), lora_bound_k=0
    )
    assert_same_image(client.generate(req), diffusers_image(reference, req, [("glow_kohya", 1.5), ("ink_kohya", 0.5)]))


def test_landing_at_step_j_equals_diffusers_fusing_at_j(client, reference):
    req = GenerationRequest(
        prompt="a photo of a cat", seed=7, steps=4, scheduler="ddim", lora_names=("ink_kohya",), lora_bound_k=2
    )
    result = client.run(req)
    assert result.lora_landed_step == 2  # the store's test delay outlasts steps 0-1, so it lands at the bound
    assert_same_image(result.image, diffusers_image(reference, req, [("ink_kohya", 1.0)], land_step=2))


def test_without_loras_landed_step_is_minus_one_and_base_is_untouched(client, reference):
    client.generate(GenerationRequest(prompt="x", steps=2, lora_names=("ink_kohya",), lora_bound_k=0))
    req = GenerationRequest(prompt="a photo of a cat", seed=1, steps=4)
    result = client.run(req)
    assert result.lora_landed_step == -1
    assert_same_image(result.image, reference(req))


@pytest.mark.parametrize("layout", ["server", "default_server"])
def test_concurrent_requests_with_different_lora_sets_each_equal_their_reference(layout, request, reference):
    """Both layouts: steps as BLS calls to ``unet`` (``server``), and the UNet in ``denoise``'s process, where the
    generations' steps are batched on its loop (``default_server``); rows with different LoRA sets never share
    weights.
    """
    server = request.getfixturevalue(layout)
    sets = [
        (),
        ("ink_kohya",),
        ("glow_kohya",),
        ("pastel_peft",),
        ("ink_kohya", "glow_kohya"),
        (),
        ("pastel_peft", "ink_kohya"),
        ("glow_kohya",),
    ]
    requests = [
        GenerationRequest(
            prompt=f"a {w}",
            seed=40 + i,
            steps=4,
            lora_names=s,
            lora_scales=(0.8,) * len(s),
            lora_bound_k=0,
            scheduler="euler_a" if i % 2 else "ddim",
        )
        for i, (w, s) in enumerate(
            zip(["cat", "dog", "tree", "house", "horse", "robot", "castle", "car"], sets, strict=True)
        )
    ]

    images = generate_concurrently(server.grpc_url, requests)
    for req, image in zip(requests, images, strict=True):
        expected = diffusers_image(reference, req, req.loras) if req.lora_names else reference(req)
        assert_same_image(image, expected)


@pytest.mark.parametrize(
    "override,error,needle",
    [
        ({"LORA_NAMES": np.array([b"nope"], dtype=object)}, NotFoundError, "ink_kohya"),
        (
            {
                "LORA_NAMES": np.array([b"ink_kohya", b"glow_kohya"], dtype=object),
                "LORA_SCALES": np.array([1.0], np.float32),
            },
            InvalidArgumentError,
            "LORA_SCALES",
        ),
        (
            {"LORA_NAMES": np.array([b"ink_kohya"], dtype=object), "LORA_BOUND_K": np.array([-2], np.int32)},
            InvalidArgumentError,
            "LORA_BOUND_K",
        ),
        ({"LORA_NAMES": np.array([b"../../etc/passwd"], dtype=object)}, InvalidArgumentError, "LORA_NAMES"),
    ],
)
def test_bad_lora_input_and_server_keeps_serving(client, reference, override, error, needle):
    assert_rejected_then_served(client, reference, override, error, needle)


def test_a_file_copied_into_the_store_is_served_without_restart(client, reference, model_dir):
    target = model_dir / "loras" / "copied_in.safetensors"
    shutil.copy(model_dir / "loras" / "ink_kohya.safetensors", target)
    try:
        req = GenerationRequest(prompt="a cat", seed=3, steps=3, lora_names=("copied_in",), lora_bound_k=0)
        ref = diffusers_image(
            reference, GenerationRequest(**{**req.__dict__, "lora_names": ("ink_kohya",)}), [("ink_kohya", 1.0)]
        )
        assert_same_image(client.generate(req), ref)
    finally:
        target.unlink()


def test_lora_cache_metrics_are_exported(server, client):
    client.generate(GenerationRequest(prompt="a cat", steps=2, lora_names=("ink_kohya",), lora_bound_k=0))
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for name in (
        "swiftdiffusion_lora_cache_hits_total",
        "swiftdiffusion_lora_cache_misses_total",
        "swiftdiffusion_lora_load_seconds_total",
        "swiftdiffusion_lora_cache_bytes",
        "swiftdiffusion_lora_cache_budget_bytes",
    ):
        assert name in text, name
    misses = [line for line in text.splitlines() if line.startswith("swiftdiffusion_lora_cache_misses_total")]
    assert float(misses[0].split()[-1]) >= 1


def test_a_lora_file_truncated_between_requests_is_refused_and_the_server_keeps_serving(client, reference, model_dir):
    target = model_dir / "loras" / "swapped.safetensors"
    source = model_dir / "loras" / "ink_kohya.safetensors"
    shutil.copy(source, target)
    req = GenerationRequest(prompt="a cat", seed=3, steps=3, lora_names=("swapped",), lora_bound_k=0)
    expected = diffusers_image(
        reference, GenerationRequest(**{**req.__dict__, "lora_names": ("ink_kohya",)}), [("ink_kohya", 1.0)]
    )
    try:
        assert_same_image(client.generate(req), expected)
        target.write_bytes(source.read_bytes()[: source.stat().st_size // 2])  # an interrupted copy
        with pytest.raises(InvalidArgumentError, match=r"LORA_NAMES.*swapped"):
            client.generate(req)
        plain = GenerationRequest(prompt="a cat", seed=3, steps=3)
        assert_same_image(client.generate(plain), reference(plain))  # no half-patched UNet behind
        shutil.copy(source, target)
        assert_same_image(client.generate(req), expected)
    finally:
        target.unlink(missing_ok=True)
