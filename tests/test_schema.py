import numpy as np
import pytest

from triton_backend.errors import InvalidRequestError
from triton_backend.schedulers import SCHEDULER_NAMES
from triton_backend.schema import FIELDS, GenerationRequest, RequestLimits, parse_request


def tensors(**overrides):
    base = GenerationRequest(prompt="a cat", negative_prompt="blurry", seed=7, steps=4, height=64, width=64)
    t = base.to_tensors()
    for k, v in overrides.items():
        if v is None:
            t.pop(k, None)
        else:
            t[k] = v
    return t


def test_round_trip_through_tensors():
    req = GenerationRequest(
        prompt="a cat",
        negative_prompt="dog",
        seed=3,
        steps=9,
        guidance_scale=2.5,
        height=128,
        width=64,
        scheduler="ddim",
    )
    assert parse_request(req.to_tensors()) == req


def test_defaults_when_optional_fields_absent():
    req = parse_request({"PROMPT": np.array([b"x"], dtype=object)})
    assert req == GenerationRequest(prompt="x")
    assert req.negative_prompt is None and req.do_classifier_free_guidance


def test_every_field_has_a_dtype_and_attribute():
    names = {f.name for f in FIELDS}
    assert names == {
        "DEADLINE_MS",
        "NUM_IMAGES",
        "CLIP_SKIP",
        "INIT_IMAGE",
        "MASK_IMAGE",
        "STRENGTH",
        "PROMPT",
        "NEGATIVE_PROMPT",
        "PROMPT_2",
        "NEGATIVE_PROMPT_2",
        "SEED",
        "STEPS",
        "GUIDANCE_SCALE",
        "HEIGHT",
        "WIDTH",
        "SCHEDULER",
        "LORA_NAMES",
        "LORA_SCALES",
        "LORA_BOUND_K",
        "CONTROLNET_NAMES",
        "CONTROLNET_IMAGES",
        "CONTROLNET_SCALES",
        "CONTROLNET_GUIDANCE_START",
        "CONTROLNET_GUIDANCE_END",
        "ORIGINAL_SIZE",
        "CROPS_COORDS_TOP_LEFT",
        "TARGET_SIZE",
    }
    for f in FIELDS:
        assert hasattr(GenerationRequest(prompt="x"), f.attr)


@pytest.mark.parametrize(
    "field,value",
    [
        ("PROMPT", None),
        ("PROMPT", np.array([b""], dtype=object)),
        ("PROMPT", np.array([b"   "], dtype=object)),
        ("PROMPT", np.array([b"\xff\xfe"], dtype=object)),
        ("PROMPT", np.array([b"a", b"b"], dtype=object)),
        ("STEPS", np.array([0], dtype=np.int32)),
        ("STEPS", np.array([-3], dtype=np.int32)),
        ("STEPS", np.array([151], dtype=np.int32)),
        ("STEPS", np.array([4], dtype=np.int64)),
        ("HEIGHT", np.array([60], dtype=np.int32)),
        ("HEIGHT", np.array([4096], dtype=np.int32)),
        ("WIDTH", np.array([-8], dtype=np.int32)),
        ("GUIDANCE_SCALE", np.array([np.nan], dtype=np.float32)),
        ("GUIDANCE_SCALE", np.array([-1.0], dtype=np.float32)),
        ("SEED", np.array([-1], dtype=np.int64)),
        ("SCHEDULER", np.array([b"warp_drive"], dtype=object)),
        ("SCHEDULER", np.array([3], dtype=np.int32)),
    ],
)
def test_bad_fields_name_the_field(field, value):
    with pytest.raises(InvalidRequestError) as info:
        parse_request(tensors(**{field: value}))
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_unknown_scheduler_lists_valid_names():
    with pytest.raises(InvalidRequestError) as info:
        parse_request(tensors(SCHEDULER=np.array([b"nope"], dtype=object)))
    for name in SCHEDULER_NAMES:
        assert name in str(info.value)


def test_limits_are_configurable():
    limits = RequestLimits(max_steps=10, max_height=128, max_width=128, max_prompt_chars=6)
    with pytest.raises(InvalidRequestError, match="STEPS"):
        parse_request(tensors(STEPS=np.array([11], dtype=np.int32)), limits)
    with pytest.raises(InvalidRequestError, match="PROMPT"):
        parse_request(tensors(PROMPT=np.array([b"much too long"], dtype=object)), limits)
    with pytest.raises(InvalidRequestError, match="WIDTH"):
        parse_request(tensors(WIDTH=np.array([136], dtype=np.int32)), limits)


def test_size_limits_refuse_before_decoding():
    limits = RequestLimits(max_prompt_bytes=8, max_hint_bytes=64 * 64 * 3)
    invalid_utf8_but_too_big = np.array([b"\xff" * 9], dtype=object)  # refused for its size, not its encoding
    with pytest.raises(InvalidRequestError, match=r"NEGATIVE_PROMPT.*9 bytes; at most 8"):
        parse_request(tensors(NEGATIVE_PROMPT=invalid_utf8_but_too_big), limits)
    two_hints = np.zeros((2, 64, 64, 3), np.uint8)
    names = np.array([b"edges", b"depth"], dtype=object)
    with pytest.raises(InvalidRequestError, match=r"CONTROLNET_IMAGES.*24576 bytes; at most 12288"):
        parse_request(
            tensors(
                CONTROLNET_NAMES=names,
                CONTROLNET_IMAGES=two_hints,
                HEIGHT=np.array([64], dtype=np.int32),
                WIDTH=np.array([64], dtype=np.int32),
            ),
            limits,
        )
    assert parse_request(tensors(PROMPT=np.array([b"12345678"], dtype=object)), limits).prompt == "12345678"


def test_only_restricts_to_a_stage_fields():
    req = parse_request({"STEPS": np.array([3], dtype=np.int32)}, only=("STEPS", "SEED"))
    assert req.steps == 3
    with pytest.raises(InvalidRequestError, match="PROMPT"):
        parse_request({}, only=("PROMPT",))


def test_lora_fields_round_trip_and_defaults():
    req = GenerationRequest(prompt="x", lora_names=("a", "b"), lora_scales=(0.5, -1.0), lora_bound_k=3)
    assert parse_request(req.to_tensors()) == req
    bare = GenerationRequest(prompt="x", lora_names=("a",))
    assert parse_request(bare.to_tensors()).loras == [("a", 1.0)]
    assert "LORA_BOUND_K" not in GenerationRequest(prompt="x", lora_bound_k=2).to_tensors()


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"LORA_NAMES": np.array([b"a", b"a"], dtype=object)}, "LORA_NAMES"),
        ({"LORA_NAMES": np.array([b""], dtype=object)}, "LORA_NAMES"),
        ({"LORA_NAMES": np.array([b"a"] * 0 + [f"n{i}".encode() for i in range(9)], dtype=object)}, "LORA_NAMES"),
        (
            {"LORA_NAMES": np.array([b"a", b"b"], dtype=object), "LORA_SCALES": np.array([1.0], np.float32)},
            "LORA_SCALES",
        ),
        ({"LORA_NAMES": np.array([b"a"], dtype=object), "LORA_SCALES": np.array([np.nan], np.float32)}, "LORA_SCALES"),
        ({"LORA_NAMES": np.array([b"a"], dtype=object), "LORA_SCALES": np.array([1.0], np.float64)}, "LORA_SCALES"),
        ({"LORA_NAMES": np.array([b"a"], dtype=object), "LORA_BOUND_K": np.array([-1], np.int32)}, "LORA_BOUND_K"),
    ],
)
def test_bad_lora_fields(overrides, field):
    with pytest.raises(InvalidRequestError) as info:
        parse_request(tensors(**overrides))
    assert info.value.field == field


def _hints(n, size=64):
    return np.zeros((n, size, size, 3), np.uint8)


def test_controlnet_fields_round_trip_and_defaults():
    req = GenerationRequest(
        prompt="x",
        controlnet_names=("edges", "depth"),
        controlnet_images=_hints(2),
        controlnet_scales=(0.5, 1.5),
        controlnet_guidance_start=(0.0, 0.25),
        controlnet_guidance_end=(1.0, 0.75),
    )
    parsed = parse_request(req.to_tensors())
    assert parsed == req and np.array_equal(parsed.controlnet_images, req.controlnet_images)
    bare = parse_request(
        GenerationRequest(prompt="x", controlnet_names=("edges",), controlnet_images=_hints(1)).to_tensors()
    )
    assert bare.controlnets == [("edges", 1.0, 0.0, 1.0)]


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"CONTROLNET_NAMES": np.array([b"edges"], dtype=object)}, "CONTROLNET_IMAGES"),
        (
            {"CONTROLNET_NAMES": np.array([b"edges", b"depth"], dtype=object), "CONTROLNET_IMAGES": _hints(1)},
            "CONTROLNET_IMAGES",
        ),
        (
            {"CONTROLNET_NAMES": np.array([b"edges"], dtype=object), "CONTROLNET_IMAGES": _hints(1)[..., :2]},
            "CONTROLNET_IMAGES",
        ),
        (
            {"CONTROLNET_NAMES": np.array([b"edges"], dtype=object), "CONTROLNET_IMAGES": _hints(1).astype(np.float32)},
            "CONTROLNET_IMAGES",
        ),
        (
            {
                "CONTROLNET_NAMES": np.array([b"edges"], dtype=object),
                "CONTROLNET_IMAGES": _hints(1),
                "CONTROLNET_SCALES": np.array([1.0, 2.0], np.float32),
            },
            "CONTROLNET_SCALES",
        ),
        (
            {
                "CONTROLNET_NAMES": np.array([b"edges"], dtype=object),
                "CONTROLNET_IMAGES": _hints(1),
                "CONTROLNET_GUIDANCE_START": np.array([0.9], np.float32),
                "CONTROLNET_GUIDANCE_END": np.array([0.5], np.float32),
            },
            "CONTROLNET_GUIDANCE_START",
        ),
    ],
)
def test_bad_controlnet_fields(overrides, field):
    with pytest.raises(InvalidRequestError) as info:
        parse_request(tensors(**overrides))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (np.array([0], dtype=np.int32), "0 is out of range; allowed 1 .. 3600000"),
        (np.array([-5], dtype=np.int32), "-5 is out of range"),
        (np.array([2_000_000_000], dtype=np.int32), "out of range"),
        (np.array([1.5], dtype=np.float32), "expected INT32"),
        (np.array([1, 2], dtype=np.int32), "exactly one element"),
    ],
)
def test_bad_deadline_names_the_field(value, needle):
    with pytest.raises(InvalidRequestError, match=needle) as info:
        parse_request({"PROMPT": np.array([b"x"], dtype=object), "DEADLINE_MS": value})
    assert info.value.field == "DEADLINE_MS"


def test_deadline_round_trips():
    req = GenerationRequest(prompt="x", deadline_ms=2500)
    assert req.to_tensors()["DEADLINE_MS"].dtype == np.int32 and parse_request(req.to_tensors()) == req


def _img2img(**fields):
    base = {"PROMPT": np.array([b"x"], dtype=object), "INIT_IMAGE": np.zeros((64, 32, 3), np.uint8)}
    return {**base, **fields}


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"STRENGTH": np.array([0.0], np.float32)}, "STRENGTH", "out of range"),
        ({"STRENGTH": np.array([1.5], np.float32)}, "STRENGTH", "out of range"),
        ({"STRENGTH": np.array([np.nan], np.float32)}, "STRENGTH", "out of range"),
        ({"NUM_IMAGES": np.array([0], np.int32)}, "NUM_IMAGES", "allowed 1 .. 8"),
        ({"NUM_IMAGES": np.array([9], np.int32)}, "NUM_IMAGES", "max_images"),
        ({"INIT_IMAGE": np.zeros((64, 32), np.uint8)}, "INIT_IMAGE", "expected UINT8 [H, W, 3]"),
        ({"INIT_IMAGE": np.zeros((60, 32, 3), np.uint8)}, "INIT_IMAGE", "multiple of 8"),
        ({"INIT_IMAGE": np.zeros((4096, 4096, 3), np.uint8)}, "INIT_IMAGE", "max_image_bytes"),
        ({"HEIGHT": np.array([32], np.int32)}, "HEIGHT", "differs from INIT_IMAGE's 64"),
        ({"MASK_IMAGE": np.zeros((32, 64), np.uint8)}, "MASK_IMAGE", "differs from INIT_IMAGE's [64, 32]"),
        ({"MASK_IMAGE": np.zeros((64, 32, 3), np.uint8)}, "MASK_IMAGE", "expected UINT8 [H, W]"),
        ({"INIT_IMAGE": None, "MASK_IMAGE": np.zeros((64, 32), np.uint8)}, "MASK_IMAGE", "needs INIT_IMAGE"),
    ],
)
def test_image_fields_are_refused_naming_the_field(fields, field, reason):
    with pytest.raises(InvalidRequestError) as info:
        parse_request(_img2img(**fields))
    assert info.value.field == field and reason in str(info.value)


def test_image_fields_round_trip():
    req = parse_request(_img2img(STRENGTH=np.array([0.5], np.float32), NUM_IMAGES=np.array([3], np.int32)))
    assert (req.strength, req.num_images, req.init_image.shape) == (0.5, 3, (64, 32, 3))
    assert parse_request(req.to_tensors()) == req
