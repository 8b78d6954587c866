"""LoRA conversion, patching and bounded asynchronous loading, in-process against diffusers (no server)."""

from __future__ import annotations

import re
import shutil
import time

import pytest
import torch

from triton_backend.config import StageConfig
from triton_backend.errors import ConfigError, InvalidRequestError, NotFoundError
from triton_backend.lora.convert import convert_lora_file
from triton_backend.lora.manager import LoraManager, make_store
from triton_backend.lora.patch import WeightPatcher, lora_delta
from triton_backend.lora.store import LoraStore, has_text_encoder_layers, lora_names
from triton_backend.pipeline import ReadyLoad
from triton_backend.schema import GenerationRequest
from triton_backend.stages import denoise

from .fakes import SlowLoraStore, slow_lora_store
from .helpers import assert_same_image, diffusers_image, pixel_diff

LORAS = ["pastel_peft", "ink_kohya", "glow_kohya"]


def generate(local, req, k=None, after=0):
    adapters = local.adapters(req.loras)
    state = denoise.prepare_encoded(req, local.text_encoder.encode_request(req, adapters), local.info)
    if req.lora_names:
        denoise.attach_loras(state, ReadyLoad(adapters, after), k if k is not None else 0)
    latents = denoise.run(state, local.unet_fn)
    return local.vae.decode(latents), state.landed_step


def test_default_loras_exist_in_both_formats(model_dir):
    assert lora_names(model_dir / "loras") == sorted(LORAS)
    assert has_text_encoder_layers(model_dir / "loras" / "pastel_peft.safetensors")
    assert has_text_encoder_layers(model_dir / "loras" / "glow_kohya.safetensors")
    assert not has_text_encoder_layers(model_dir / "loras" / "ink_kohya.safetensors")


@pytest.mark.parametrize("name", LORAS)
def test_each_default_lora_changes_the_image(local, name):
    base, _ = generate(local, GenerationRequest(prompt="a photo of a cat", seed=1, steps=4))
    with_lora, _ = generate(local, GenerationRequest(prompt="a photo of a cat", seed=1, steps=4, lora_names=(name,)))
    assert pixel_diff(base, with_lora)[1] >= 2.0


@pytest.mark.parametrize("name", LORAS)
def test_k0_equals_diffusers_fused(local, reference, name):
    req = GenerationRequest(prompt="a photo of a cat", negative_prompt="blurry", seed=3, steps=4, lora_names=(name,))
    ours, landed = generate(local, req, k=0)
    assert landed == 0
    assert_same_image(ours, diffusers_image(reference, req, [(name, 1.0)]))


def test_two_loras_with_scales_equal_diffusers_set_adapters(local, reference):
    loras = [("ink_kohya", 0.7), ("pastel_peft", -0.4)]
    req = GenerationRequest(
        prompt="a red house",
        seed=5,
        steps=4,
        scheduler="ddim",
        lora_names=("ink_kohya", "pastel_peft"),
        lora_scales=(0.7, -0.4),
    )
    ours, _ = generate(local, req, k=0)
    assert_same_image(ours, diffusers_image(reference, req, loras))


@pytest.mark.parametrize("land", [1, 2])
def test_landing_at_step_j_equals_diffusers_fusing_at_j(local, reference, land):
    """DDIM: every step counts, so landing at j and at j + 1 give clearly different images (shown below)."""
    req = GenerationRequest(prompt="a photo of a cat", seed=7, steps=4, scheduler="ddim", lora_names=("ink_kohya",))
    ours, landed = generate(local, req, k=land, after=10**6)  # never ready early: lands exactly at k
    assert landed == land
    assert_same_image(ours, diffusers_image(reference, req, [("ink_kohya", 1.0)], land_step=land))
    later, _ = generate(local, req, k=land + 1, after=10**6)
    assert pixel_diff(ours, later)[1] >= 2.0, "landing at j and j+1 must differ for this test to be able to fail"


def test_lands_early_when_ready_before_the_bound(local):
    req = GenerationRequest(prompt="x", seed=1, steps=4, lora_names=("ink_kohya",))
    _, landed = generate(local, req, k=3, after=1)  # ready on the second poll
    assert landed == 1


def test_restore_is_bit_identical_after_many_cycles(local):
    model = local.unet.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patcher = WeightPatcher(model, "unet")
    sets = [local.adapters([("ink_kohya", 1.0)]), local.adapters([("pastel_peft", 0.5), ("glow_kohya", 2.0)]), ()]
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


def test_store_caches_and_never_serves_a_changed_file_stale(local, model_dir, tmp_path):
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
    assert {entry.name for _, entry in store.cache.items()} == {"ink_kohya", "pastel_peft"}
    store.close()


def test_unknown_and_bad_names(local):
    with pytest.raises(NotFoundError) as info:
        local.loras.get("nope")
    assert info.value.field == "LORA_NAMES" and "ink_kohya" in str(info.value)
    with pytest.raises(InvalidRequestError, match="LORA_NAMES"):
        local.loras.get("../etc/passwd")


def test_corrupt_or_foreign_lora_is_invalid(local, tmp_path, model_dir):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidRequestError, match="LORA_NAMES"):
        convert_lora_file(bad, {"unet": local.unet.model, "text_encoder": local.text_encoder.models[0]})
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
    with pytest.raises(InvalidRequestError, match=r"another architecture.*do not match"):
        convert_lora_file(foreign, {"unet": local.unet.model, "text_encoder": local.text_encoder.models[0]})


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


def test_slow_store_delays_each_request_once_and_emulates_storage_on_misses(model_dir, tmp_path):
    """The fake behind the test server's deterministic landing step and the slow store of scripts/bench_lora.py."""
    size = (model_dir / "loras" / "ink_kohya.safetensors").stat().st_size
    store = SlowLoraStore(  # options as strings, as parameter lora_store passes them
        root=model_dir / "loras",
        convert=lambda p: {"unet:x.lora_A": torch.zeros(1)},
        cache_root=tmp_path / "swiftdiffusion-lora-slow",
        delay_s="0.2",
        latency_ms="300",
        mbps=str(size * 8 / 0.3 / 1e6),  # the file's size takes 0.3 s
    )

    def seconds(call, *args):
        start = time.perf_counter()
        call(*args)
        return time.perf_counter() - start

    assert seconds(store.get_many, ["ink_kohya"]) >= 0.8  # a miss: latency + size / bandwidth, then the delay
    assert store.stats.load_seconds >= 0.6  # the emulated read is part of the load
    assert 0.2 <= seconds(store.get_many, ["ink_kohya"]) < 0.6  # a hit: the delay only
    store.get("glow_kohya")
    assert 0.2 <= seconds(store.get_many, ["ink_kohya", "glow_kohya"]) < 0.4  # once per request, not per LoRA
    assert seconds(store.get, "ink_kohya") < 0.2  # the delay is the request's, not each lookup's
    store.close()


def test_lora_store_parameter_picks_the_store_and_a_bad_value_fails_the_load_naming_it(model_dir):
    def cfg(value: str) -> StageConfig:
        return StageConfig.from_params("lora_manager", {"model_dir": str(model_dir), "lora_store": value})

    def convert(path):
        return {}

    default = make_store(cfg(""), convert)
    assert type(default) is LoraStore and default.root == model_dir / "loras" and default.budget_bytes == 1 << 30
    default.close()
    slow = make_store(cfg(slow_lora_store(delay_s=0.5, mbps=8)), convert)
    assert type(slow) is SlowLoraStore and (slow.delay_s, slow.latency_s, slow.bandwidth_bps) == (0.5, 0, 1e6)
    assert slow.root == model_dir / "loras" and slow.budget_bytes == 1 << 30
    slow.close()
    for bad, reason in [
        ("SlowLoraStore", "is not module:Class"),
        ("tests.no_such_module:SlowLoraStore", "cannot be imported"),
        ("tests.fakes:NoSuchStore", "does not name a subclass"),
        ("tests.fakes:slow_lora_store", "does not name a subclass"),  # a function, not a store class
        ("triton_backend.lora.store:CacheEntry", "does not name a subclass"),
        ("tests.fakes:SlowLoraStore?delay_s", "options are key=value"),
        ("tests.fakes:SlowLoraStore?speed=1", "unexpected keyword argument 'speed'"),
        ("tests.fakes:SlowLoraStore?delay_s=soon", "could not convert"),
    ]:
        with pytest.raises(ConfigError, match=rf"^lora_manager: parameter lora_store='{re.escape(bad)}'.*{reason}"):
            make_store(cfg(bad), convert)
    with pytest.raises(ConfigError, match="parameter lora_store="):  # the stage's load
        LoraManager(cfg("tests.fakes:NoSuchStore"))


def test_a_file_changed_while_it_is_converted_is_refused_and_not_cached(model_dir, tmp_path):
    root = tmp_path / "loras"
    root.mkdir()
    shutil.copy(model_dir / "loras" / "ink_kohya.safetensors", root / "mine.safetensors")
    calls = []

    def convert(path):  # the operator replaces the file while it is being read
        calls.append(path)
        if len(calls) == 1:
            time.sleep(0.01)
            shutil.copy(model_dir / "loras" / "glow_kohya.safetensors", path)
        return {"unet:x.lora_A": torch.zeros(4)}

    store = LoraStore(root=root, convert=convert, cache_root=tmp_path / "swiftdiffusion-lora-z")
    with pytest.raises(InvalidRequestError, match=r"LORA_NAMES.*changed or was removed"):
        store.get("mine")
    assert store.stats.bytes_resident == 0 and list(store.cache_dir.iterdir()) == []
    assert store.get("mine").file.is_file() and len(calls) == 2  # the next request converts the new file
    store.close()


def test_a_full_shared_memory_fails_the_request_with_a_clear_error_and_leaves_nothing(model_dir, tmp_path):
    """``/dev/shm`` nearly full, emulated with a file-size limit (writes past it fail as a full disk does)."""
    import resource
    import signal

    from triton_backend.errors import StageUnavailableError

    store = LoraStore(
        root=model_dir / "loras",
        convert=lambda p: {"unet:x.lora_A": torch.zeros(1 << 16)},
        cache_root=tmp_path / "swiftdiffusion-lora-full",
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
    try:
        with pytest.raises(StageUnavailableError, match=r"lora_manager: cannot write .*cache_budget_mb"):
            store.get("ink_kohya")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert list(store.cache_dir.iterdir()) == [] and store.stats.bytes_resident == 0
    assert store.get("ink_kohya").file.is_file()  # space again: served
    store.close()
