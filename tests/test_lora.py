"""LoRA conversion, patching and bounded asynchronous loading, in-process against diffusers (no server)."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch

from triton_backend import denoise
from triton_backend.components import ModelInfo
from triton_backend.config import StageConfig
from triton_backend.errors import InvalidRequestError, NotFoundError
from triton_backend.lora.convert import convert_lora_file, load_skeletons
from triton_backend.lora.patch import AdapterRef, WeightPatcher, lora_delta
from triton_backend.lora.store import LoraStore, has_text_encoder_layers, lora_names
from triton_backend.schema import GenerationRequest

from .conftest import assert_same_image, pixel_diff

LORAS = ["pastel_peft", "ink_kohya", "glow_kohya"]


@pytest.fixture(scope="module")
def env(model_dir, tmp_path_factory):
    from triton_backend.text_encoding import TextEncoder
    from triton_backend.unet_step import StepInput, UNetStep
    from triton_backend.vae_decode import VaeDecoder

    cfg = StageConfig.from_params("test", {"model_dir": str(model_dir)})
    te, unet, vae = TextEncoder(cfg), UNetStep(cfg), VaeDecoder(cfg)
    skeletons = load_skeletons(cfg)
    store = LoraStore(
        root=model_dir / "loras",
        convert=lambda p: convert_lora_file(p, skeletons),
        cache_root=tmp_path_factory.mktemp("lora-cache") / "swiftdiffusion-lora-test",
    )

    def unet_fn(*call):
        return unet.forward(StepInput.of(*call))

    class Env:
        pass

    e = Env()
    e.te, e.unet, e.vae, e.store, e.unet_fn, e.info = te, unet, vae, store, unet_fn, ModelInfo.read(model_dir)

    def refs(loras):
        return tuple(AdapterRef(n, str(store.get(n).file), s) for n, s in loras)

    e.refs = refs
    yield e
    store.close()


class Ready:
    """A LoRA load that is done from the start, or only after ``after`` polls (deterministic landing)."""

    def __init__(self, adapters, after=0):
        self.adapters, self.after, self.polls = adapters, after, 0

    def done(self):
        self.polls += 1
        return self.polls > self.after

    def result(self):
        return self.adapters


def generate(env, req, k=None, after=0):
    adapters = env.refs(req.loras)
    state = denoise.prepare_encoded(req, env.te.encode_request(req, adapters), env.info)
    if req.lora_names:
        denoise.attach_loras(state, Ready(adapters, after), k if k is not None else 0)
    latents = denoise.run(state, env.unet_fn)
    return env.vae.decode(latents), state.landed_step


def diffusers_image(reference, req, loras, land_step=0):
    """diffusers: load_lora_weights + set_adapters + fuse_lora, before the call or at ``land_step`` (callback)."""
    pipe = reference.pipe
    names = [n for n, _ in loras]
    te_req = GenerationRequest(**{**req.__dict__, "lora_names": (), "lora_scales": ()})

    def load_and_fuse():
        for n in names:
            pipe.load_lora_weights(str(env_lora_dir(pipe) / f"{n}.safetensors"), adapter_name=n)
        pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
        pipe.fuse_lora(adapter_names=names)

    try:
        if land_step == 0:
            load_and_fuse()
            return reference(te_req)

        def callback(p, i, t, kwargs):  # after step land_step - 1: steps >= land_step run fused
            if i == land_step - 1:
                load_and_fuse()
            return kwargs

        return reference_with_callback(reference, te_req, callback)
    finally:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()


def env_lora_dir(pipe):
    from pathlib import Path

    return Path(pipe.config._name_or_path) / "loras"


def reference_with_callback(reference, req, callback):
    from triton_backend.schedulers import make_scheduler

    pipe = reference.pipe
    pipe.scheduler = make_scheduler(req.scheduler, reference.base_scheduler)
    out = pipe(
        req.prompt,
        negative_prompt=req.negative_prompt,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(req.seed),
        output_type="np",
        callback_on_step_end=callback,
    ).images[0]
    return (out * 255).round().astype(np.uint8)


def test_default_loras_exist_in_both_formats(model_dir):
    assert lora_names(model_dir / "loras") == sorted(LORAS)
    assert has_text_encoder_layers(model_dir / "loras" / "pastel_peft.safetensors")
    assert has_text_encoder_layers(model_dir / "loras" / "glow_kohya.safetensors")
    assert not has_text_encoder_layers(model_dir / "loras" / "ink_kohya.safetensors")


@pytest.mark.parametrize("name", LORAS)
def test_each_default_lora_changes_the_image(env, name):
    base, _ = generate(env, GenerationRequest(prompt="a photo of a cat", seed=1, steps=4))
    with_lora, _ = generate(env, GenerationRequest(prompt="a photo of a cat", seed=1, steps=4, lora_names=(name,)))
    assert pixel_diff(base, with_lora)[1] >= 2.0


@pytest.mark.parametrize("name", LORAS)
def test_k0_equals_diffusers_fused(env, reference, name):
    req = GenerationRequest(prompt="a photo of a cat", negative_prompt="blurry", seed=3, steps=4, lora_names=(name,))
    ours, landed = generate(env, req, k=0)
    assert landed == 0
    assert_same_image(ours, diffusers_image(reference, req, [(name, 1.0)]))


def test_two_loras_with_scales_equal_diffusers_set_adapters(env, reference):
    loras = [("ink_kohya", 0.7), ("pastel_peft", -0.4)]
    req = GenerationRequest(
        prompt="a red house",
        seed=5,
        steps=4,
        scheduler="ddim",
        lora_names=("ink_kohya", "pastel_peft"),
        lora_scales=(0.7, -0.4),
    )
    ours, _ = generate(env, req, k=0)
    assert_same_image(ours, diffusers_image(reference, req, loras))


@pytest.mark.parametrize("land", [1, 2])
def test_landing_at_step_j_equals_diffusers_fusing_at_j(env, reference, land):
    """DDIM: every step counts, so landing at j and at j + 1 give clearly different images (shown below)."""
    req = GenerationRequest(prompt="a photo of a cat", seed=7, steps=4, scheduler="ddim", lora_names=("ink_kohya",))
    ours, landed = generate(env, req, k=land, after=10**6)  # never ready early: lands exactly at k
    assert landed == land
    assert_same_image(ours, diffusers_image(reference, req, [("ink_kohya", 1.0)], land_step=land))
    later, _ = generate(env, req, k=land + 1, after=10**6)
    assert pixel_diff(ours, later)[1] >= 2.0, "landing at j and j+1 must differ for this test to be able to fail"


def test_lands_early_when_ready_before_the_bound(env):
    req = GenerationRequest(prompt="x", seed=1, steps=4, lora_names=("ink_kohya",))
    _, landed = generate(env, req, k=3, after=1)  # ready on the second poll
    assert landed == 1


def test_restore_is_bit_identical_after_many_cycles(env):
    model = env.unet.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patcher = WeightPatcher(model, "unet")
    sets = [env.refs([("ink_kohya", 1.0)]), env.refs([("pastel_peft", 0.5), ("glow_kohya", 2.0)]), ()]
    for i in range(30):
        patcher.ensure(sets[i % 3])
    patcher.restore()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_patch_math_is_sum_of_scaled_products_not_product_of_sums():
    a1, b1, a2, b2 = torch.randn(2, 6), torch.randn(5, 2), torch.randn(3, 6), torch.randn(5, 3)
    w = torch.zeros(5, 6)
    expected = 0.5 * (b1 @ a1) + 2.0 * (b2 @ a2)
    got = 0.5 * lora_delta(a1, b1, w.shape) + 2.0 * lora_delta(a2, b2, w.shape)
    torch.testing.assert_close(got, expected)
    conv_a, conv_b = torch.randn(2, 4, 3, 3), torch.randn(7, 2, 1, 1)
    delta = lora_delta(conv_a, conv_b, torch.Size([7, 4, 3, 3]))
    torch.testing.assert_close(delta, torch.einsum("or,rihw->oihw", conv_b[:, :, 0, 0], conv_a))


def test_store_caches_and_never_serves_a_changed_file_stale(env, model_dir, tmp_path):
    root = tmp_path / "loras"
    root.mkdir()
    shutil.copy(model_dir / "loras" / "ink_kohya.safetensors", root / "mine.safetensors")
    calls = []

    def convert(path):
        calls.append(path)
        return {
            "unet:x.lora_A": torch.zeros(1, 1),
            "unet:x.lora_B": torch.zeros(1, 1),
            "unet:x.scaling": torch.ones(()),
        }

    store = LoraStore(root=root, convert=convert, cache_root=tmp_path / "swiftdiffusion-lora-x", budget_bytes=10**9)
    first = store.get("mine")
    assert store.get("mine") == first and len(calls) == 1 and store.stats.hits == 1
    time.sleep(0.01)
    shutil.copy(model_dir / "loras" / "glow_kohya.safetensors", root / "mine.safetensors")
    second = store.get("mine")
    assert len(calls) == 2 and second.file != first.file and not first.file.exists()
    shutil.copy(model_dir / "loras" / "pastel_peft.safetensors", root / "new_one.safetensors")
    assert "new_one" in store.names()  # servable without a restart
    store.close()


def test_store_budget_evicts_least_recently_used(model_dir, tmp_path):
    def convert(path):
        return {"unet:x.lora_A": torch.zeros(256, 256)}

    store = LoraStore(root=model_dir / "loras", convert=convert, cache_root=tmp_path / "swiftdiffusion-lora-y")
    one = store.get("ink_kohya")
    store.budget_bytes = one.nbytes * 2 + 10
    store.get("glow_kohya")
    store.get("ink_kohya")  # touch: glow is now least recently used
    store.get("pastel_peft")
    assert store.stats.evictions == 1 and store.stats.bytes_resident <= store.budget_bytes
    assert {k[0] for k in store._entries} == {"ink_kohya", "pastel_peft"}
    store.close()


def test_unknown_and_bad_names(env):
    with pytest.raises(NotFoundError) as info:
        env.store.get("nope")
    assert info.value.field == "LORA_NAMES" and "ink_kohya" in str(info.value)
    with pytest.raises(InvalidRequestError, match="LORA_NAMES"):
        env.store.get("../etc/passwd")


def test_corrupt_or_foreign_lora_is_invalid(env, tmp_path, model_dir):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidRequestError, match="LORA_NAMES"):
        convert_lora_file(bad, {"unet": env.unet.model, "text_encoder": env.te.models[0]})
    foreign = tmp_path / "foreign.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(
                4, 640
            ),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 4),
        },
        str(foreign),
    )
    with pytest.raises(InvalidRequestError, match="another architecture.*do not match"):
        convert_lora_file(foreign, {"unet": env.unet.model, "text_encoder": env.te.models[0]})


def test_names_that_leave_the_store_and_corrupt_files_are_invalid(model_dir, tmp_path):
    from triton_backend.lora.store import resolve_lora_path

    root = tmp_path / "store"
    root.mkdir()
    outside = tmp_path / "outside.safetensors"
    shutil.copy(model_dir / "loras" / "ink_kohya.safetensors", outside)
    (root / "sneaky.safetensors").symlink_to(outside)
    for bad in ("../outside", "/etc/passwd", "a/b"):
        with pytest.raises(InvalidRequestError, match="LORA_NAMES"):
            resolve_lora_path(root, bad)
    with pytest.raises(InvalidRequestError, match="outside"):
        resolve_lora_path(root, "sneaky")
    truncated = root / "truncated.safetensors"
    truncated.write_bytes((model_dir / "loras" / "ink_kohya.safetensors").read_bytes()[:100])
    with pytest.raises(InvalidRequestError, match="truncated"):
        has_text_encoder_layers(resolve_lora_path(root, "truncated"))


def test_emulated_slow_storage_delays_misses_only(model_dir, tmp_path):
    store = LoraStore(
        root=model_dir / "loras",
        convert=lambda p: {"unet:x.lora_A": torch.zeros(1)},
        cache_root=tmp_path / "swiftdiffusion-lora-slow",
        emulate_latency_s=0.2,
    )
    start = time.perf_counter()
    store.get("ink_kohya")
    miss = time.perf_counter() - start
    start = time.perf_counter()
    store.get("ink_kohya")
    hit = time.perf_counter() - start
    assert miss >= 0.2 > hit
    store.close()
