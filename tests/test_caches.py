"""The LRU every cache is (``ByteLRU``), and the caches: prompt embeddings (text_encoder), hint embeddings and
resident ControlNets (controlnet), converted LoRAs (lora_manager). A hit changes no image; anything the result
depends on that changes is a miss; nothing of a failed request stays cached."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from triton_backend import parameters
from triton_backend.cache import ByteLRU, LRUStats
from triton_backend.config import StageConfig
from triton_backend.controlnet.service import HINT_TENSORS_KEPT, ControlNetService
from triton_backend.errors import ConfigError, InvalidRequestError, NotFoundError
from triton_backend.lora.store import LoraStore
from triton_backend.parameters import mib
from triton_backend.schema import GenerationRequest

from .helpers import assert_same_image, diffusers_controlnet_image, hint_images


def test_lru_evicts_least_recently_used_within_the_budget():
    gone = []
    cache: ByteLRU[bytes] = ByteLRU(10, size=len, on_evict=gone.append)
    cache.put("a", b"xxxx")
    cache.put("b", b"yyyy")
    assert cache.get("a") == b"xxxx"  # a is now the most recent
    cache.put("c", b"zzzz")  # 12 > 10: evicts b
    assert cache.get("b") is None and gone == [b"yyyy"]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions, cache.stats.bytes_resident) == (1, 1, 1, 8)
    cache.put("big", b"0" * 11)  # larger than the budget: not kept, nothing else evicted
    assert cache.get("big") is None and len(cache) == 2 and gone[-1] == b"0" * 11
    cache.clear()
    assert cache.stats.bytes_resident == 0 and len(cache) == 0


def test_a_zero_budget_disables_the_cache():
    cache: ByteLRU[bytes] = ByteLRU(0, size=len)
    cache.put("a", b"x")
    assert cache.get("a") is None and len(cache) == 0


def test_a_count_budget_keeps_that_many_entries():
    """``size=lambda v: 1``: the budget counts entries (resident ControlNets, hint tensors)."""
    cache: ByteLRU[str] = ByteLRU(2, size=lambda _: 1)
    for key in ("a", "b"):
        cache.put(key, key.upper())
    assert cache.get("a") == "A"
    cache.put("c", "C")
    assert [k for k, _ in cache.items()] == ["a", "c"] and "b" not in cache
    assert (cache.stats.hits, cache.stats.evictions, cache.stats.bytes_resident) == (1, 1, 2)


def test_keep_newest_keeps_an_entry_larger_than_the_budget_and_evicts_the_rest():
    """``keep_newest`` (converted LoRAs: the newest is being served): never the entry just put."""
    gone = []
    cache: ByteLRU[bytes] = ByteLRU(10, size=len, on_evict=gone.append, keep_newest=True)
    cache.put("a", b"xxxx")
    cache.put("b", b"yyyy")
    cache.put("big", b"0" * 11)
    assert gone == [b"xxxx", b"yyyy"] and [k for k, _ in cache.items()] == ["big"]
    assert (cache.stats.evictions, cache.stats.bytes_resident) == (2, 11)
    cache.put("c", b"zzzz")
    assert gone[-1] == b"0" * 11 and [k for k, _ in cache.items()] == ["c"]
    zero: ByteLRU[bytes] = ByteLRU(0, size=len, keep_newest=True)
    zero.put("a", b"x")
    zero.put("b", b"y")
    assert [k for k, _ in zero.items()] == ["b"]


def test_an_invalid_entry_is_a_miss_and_stays_until_replaced():
    """``get(key, valid)``: a value whose source changed (a ControlNet's signature, a LoRA file removed) misses."""
    gone = []
    cache: ByteLRU[bytes] = ByteLRU(10, size=len, on_evict=gone.append)
    cache.put("a", b"old")
    cache.put("b", b"bb")
    assert cache.get("a", valid=lambda v: v != b"old") is None
    assert cache.stats.misses == 1 and "a" in cache and [k for k, _ in cache.items()] == ["a", "b"]  # not touched
    assert cache.get("a", valid=lambda v: v == b"old") == b"old" and cache.stats.hits == 1
    cache.put("a", b"new")  # the reload replaces it: its on_evict runs, not counted as an eviction
    assert gone == [b"old"] and cache.stats.evictions == 0 and cache.stats.bytes_resident == 5


def test_lookups_that_count_nothing_and_shared_stats():
    stats = LRUStats()
    cache: ByteLRU[bytes] = ByteLRU(10, size=len, stats=stats)
    cache.put("a", b"x")
    cache.put("b", b"y")
    assert "a" in cache and "c" not in cache and cache.items() == [("a", b"x"), ("b", b"y")]
    assert (stats.hits, stats.misses, stats.bytes_resident) == (0, 0, 2)  # the owner's stats object is the cache's


def test_the_lora_store_keeps_its_newest_entry_and_reconverts_a_removed_file(model_dir, tmp_path):
    store = LoraStore(
        root=model_dir / "loras",
        convert=lambda p: {"unet:x.lora_A": torch.zeros(64)},
        budget_bytes=1,  # every entry is larger than the budget
        cache_root=tmp_path / "swiftdiffusion-lora-lru",
    )
    ink = store.get("ink_kohya")
    assert ink.file.is_file() and store.stats.bytes_resident == ink.nbytes  # served: kept over the budget
    glow = store.get("glow_kohya")
    assert not ink.file.exists() and glow.file.is_file() and store.stats.evictions == 1
    glow.file.unlink()  # removed under the store (a sweep of shared memory)
    again = store.get("glow_kohya")
    assert again.file.is_file() and store.stats.misses == 3 and store.stats.loads == 3
    assert store.stats.bytes_resident == again.nbytes and len(store.cache) == 1
    store.close()
    assert store.stats.bytes_resident == 0 and not store.cache_dir.exists()


def test_a_changed_controlnet_misses_and_replaces_the_resident_one(model_dir, tmp_path):
    root = tmp_path / "controlnets"
    shutil.copytree(model_dir / "controlnets" / "edges", root / "edges")
    cfg = StageConfig.from_params("controlnet", {"model_dir": str(model_dir), "controlnet_dir": str(root)})
    service = ControlNetService(cfg, capacity=2)
    try:
        first, _ = service.model("edges")
        assert service.model("edges")[0] is first
        config = root / "edges" / "config.json"
        stat = config.stat()
        os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a new signature
        second, _ = service.model("edges")
        assert second is not first and service.resident == 1
        assert (service.stats.hits, service.stats.misses, service.stats.loads) == (1, 2, 2)
        assert service.stats.load_seconds > 0 and service._hints.budget_bytes == HINT_TENSORS_KEPT
    finally:
        service.close()


def test_a_cache_budget_is_mib_and_a_bad_one_fails_naming_it():
    assert mib(parameters.parse("t", "text_encoder", {})["prompt_cache_mb"]) == 64 << 20
    assert mib(parameters.parse("t", "text_encoder", {"prompt_cache_mb": "0.5"})["prompt_cache_mb"]) == 1 << 19
    assert mib(parameters.parse("t", "text_encoder", {"prompt_cache_mb": "0"})["prompt_cache_mb"]) == 0
    for bad in ("lots", "-1", "nan"):
        with pytest.raises(ConfigError, match=r"t: parameter prompt_cache_mb=.*allowed: a number >= 0"):
            parameters.parse("t", "text_encoder", {"prompt_cache_mb": bad})


def generate(local, req):
    return local.generate(req).image


def test_a_repeated_prompt_hits_and_changes_no_image(local, reference):
    te = local.text_encoder
    req = GenerationRequest(prompt="a cached cat", negative_prompt="blurry", seed=4, steps=3)
    te.cache.clear()
    first = generate(local, req)
    hits = te.cache.stats.hits
    second = generate(local, req)
    assert te.cache.stats.hits == hits + 1
    assert np.array_equal(first, second)
    assert_same_image(second, reference(req))


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a cached dog"},
        {"negative_prompt": "sharp"},
        {"negative_prompt": None},
        {"guidance_scale": 1.0},  # no unconditional branch
    ],
)
def test_a_changed_prompt_field_misses(local, change):
    te = local.text_encoder
    base = dict(prompt="a cached cat", negative_prompt="blurry", seed=4, steps=3)
    te.encode_request(GenerationRequest(**base))
    misses = te.cache.stats.misses
    out = te.encode_request(GenerationRequest(**{**base, **change}))
    assert te.cache.stats.misses == misses + 1
    assert not np.array_equal(out["PROMPT_EMBEDS"], te.encode_request(GenerationRequest(**base))["PROMPT_EMBEDS"])


def test_text_encoder_loras_and_their_scales_are_part_of_the_key(local):
    te = local.text_encoder
    req = GenerationRequest(prompt="a cached cat", seed=1, steps=2)
    plain = te.encode_request(req)["PROMPT_EMBEDS"]
    with_te = te.encode_request(req, local.adapters([("glow_kohya", 1.0)]))["PROMPT_EMBEDS"]
    scaled = te.encode_request(req, local.adapters([("glow_kohya", 0.5)]))["PROMPT_EMBEDS"]
    assert not np.array_equal(plain, with_te) and not np.array_equal(with_te, scaled)
    assert np.array_equal(te.encode_request(req)["PROMPT_EMBEDS"], plain)  # the LoRA was restored, not cached over


def test_a_cached_result_is_not_shared_with_the_caller(local):
    te = local.text_encoder
    req = GenerationRequest(prompt="mutate me", steps=2)
    out = te.encode_request(req)
    out["PROMPT_EMBEDS"][:] = 0
    assert np.abs(te.encode_request(req)["PROMPT_EMBEDS"]).sum() > 0


def cn_request(images, seed=3):
    return GenerationRequest(
        prompt="a photo of a cat", seed=seed, steps=3, controlnet_names=("edges",), controlnet_images=images
    )


def test_a_repeated_hint_is_embedded_once_and_changes_no_image(local, reference, model_dir):
    service = local.controlnets
    service.hint_cache.clear()
    _, embedding = service.model("edges")
    calls = []
    handle = embedding.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = generate(local, cn_request(hint_images(1, seed=7)))
        second = generate(local, cn_request(hint_images(1, seed=7), seed=4))  # same hint, another prompt seed
        again = generate(local, cn_request(hint_images(1, seed=7)))
    finally:
        handle.remove()
    assert len(calls) == 1 and service.hint_cache.stats.hits >= 2
    assert np.array_equal(first, again) and not np.array_equal(first, second)
    assert_same_image(again, diffusers_controlnet_image(reference, model_dir, cn_request(hint_images(1, seed=7))))


def test_each_request_gets_its_own_file_and_releasing_it_keeps_the_cache(local):
    service = local.controlnets
    image = hint_images(1, seed=8)[0]
    a, b = service.prepare("edges", image), service.prepare("edges", image)
    assert a != b and Path(a).read_bytes() == Path(b).read_bytes()
    Path(a).unlink()  # request a ends
    assert Path(b).is_file()
    c = service.prepare("edges", image)
    assert Path(c).read_bytes() == Path(b).read_bytes()
    for f in (b, c):
        Path(f).unlink()


def test_a_changed_image_size_or_controlnet_misses(local):
    service = local.controlnets
    image = hint_images(1, 64, seed=9)[0]
    files = [service.prepare("edges", image)]
    misses = service.hint_cache.stats.misses
    one_pixel = image.copy()
    one_pixel[0, 0, 0] ^= 1
    same_bytes_other_shape = image.reshape(32, 128, 3)  # identical bytes, another size: a different hint
    for name, img in (("edges", one_pixel), ("edges", same_bytes_other_shape), ("depth", image)):
        files.append(service.prepare(name, img))
    assert service.hint_cache.stats.misses == misses + 3
    embeddings = [Path(f).read_bytes() for f in files]
    assert len(set(embeddings)) == 4
    for f in files:
        Path(f).unlink()


def test_a_failed_prepare_caches_nothing(local):
    service = local.controlnets
    entries = len(service.hint_cache)
    with pytest.raises(NotFoundError, match="CONTROLNET_NAMES"):
        service.prepare("no-such-net", hint_images(1)[0])
    with pytest.raises(InvalidRequestError, match="CONTROLNET_IMAGES"):
        service.prepare("edges", hint_images(1)[0].astype(np.float32))
    assert len(service.hint_cache) == entries
