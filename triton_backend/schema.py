"""The public request schema of ``txt2img``: one frozen dataclass, parsed in one place.

Pure (numpy only) so that the client library builds its inputs from the same table without importing torch.

Inputs of ``txt2img`` (all shape ``[1]``)::

    PROMPT           BYTES  required, UTF-8, non-empty; A1111 syntax (weights, BREAK), any length in 75-token chunks,
                            textual-inversion embeddings by file stem; a plain prompt of at most 75 tokens is
                            encoded exactly as diffusers does
    NEGATIVE_PROMPT  BYTES  optional, default none (diffusers' empty unconditional prompt; SDXL models with
                            ``force_zeros_for_empty_prompt``: zero unconditional embeddings, as diffusers)
    SEED             INT64  optional, default 0; seeds a CPU ``torch.Generator`` exactly as diffusers does
    STEPS            INT32  optional, default 20; 1 .. max_steps
    GUIDANCE_SCALE   FP32   optional, default 7.5; <= 1 skips the unconditional branch (as diffusers)
    HEIGHT, WIDTH    INT32  optional, default 0 = the model's native size; multiples of 8, <= max_height/width
    SCHEDULER        BYTES  optional, default "default" (the model directory's scheduler); a name of
                            ``triton_backend/schedulers.py``'s table or an A1111/ComfyUI spelling of one

LoRAs (bounded asynchronous loading)::

    LORA_NAMES       BYTES [m]  optional; names in the LoRA store (file names without .safetensors), unique
    LORA_SCALES      FP32  [m]  optional, default 1.0 each; finite, |s| <= 16
    LORA_BOUND_K     INT32 [1]  optional, default: the deployment's ``lora_bound_k``; the step by which the LoRAs
                                must be patched in (0 = before the first step); clamped to STEPS - 1

ControlNets (ControlNet-as-a-Service)::

    CONTROLNET_NAMES           BYTES [n]           optional; ControlNets in the store, may repeat
    CONTROLNET_IMAGES          UINT8 [n, H, W, 3]  required with names; hint images at the output size
    CONTROLNET_SCALES          FP32  [n]           optional, default 1.0 each (diffusers' conditioning scale)
    CONTROLNET_GUIDANCE_START  FP32  [n]           optional, default 0.0 (diffusers' control_guidance_start)
    CONTROLNET_GUIDANCE_END    FP32  [n]           optional, default 1.0 (diffusers' control_guidance_end)

SDXL only (an SD model rejects them by name)::

    PROMPT_2               BYTES [1]  optional, default PROMPT: the second text encoder's prompt
    NEGATIVE_PROMPT_2      BYTES [1]  optional, default NEGATIVE_PROMPT (ignored when NEGATIVE_PROMPT is absent and
                                      the model zeroes empty negative prompts, as diffusers)

    ORIGINAL_SIZE          INT32 [2]  optional, (height, width), default the output size
    CROPS_COORDS_TOP_LEFT  INT32 [2]  optional, (top, left), default (0, 0)
    TARGET_SIZE            INT32 [2]  optional, (height, width), default the output size

Images (``img2img``: ``INIT_IMAGE`` required; ``txt2img`` has only ``NUM_IMAGES``)::

    NUM_IMAGES     INT32 [1]        optional, default 1; 1 .. max_images images, image i seeded SEED + i (A1111's
                                    batch), stepped together as rows of one UNet batch; outputs ``IMAGES [n, H, W, 3]``
    INIT_IMAGE     UINT8 [H, W, 3]  the image to start from; the output has its size (HEIGHT/WIDTH, when given, must
                                    match); at most max_image_bytes
    STRENGTH       FP32  [1]        optional, in (0, 1]; how much of the image is repainted: the last
                                    int(STEPS * STRENGTH) of the STEPS timesteps run; default the diffusers pipeline's
                                    (SD img2img 0.8, SD inpainting 1.0, SDXL img2img 0.3 or 0.8 with a ControlNet,
                                    SDXL inpainting 0.9999)
    MASK_IMAGE     UINT8 [H, W]     optional (inpainting): 255 = repaint, 0 = keep (binarized at 128 as diffusers'
                                    mask processor); a 4-channel UNet blends latents, a 9-channel inpainting UNet takes
                                    the mask and the masked image's latents

Prompts::

    CLIP_SKIP      INT32 [1]        optional, default 1; A1111's "Clip skip": 1 = the text encoder's last layer, 2 =
                                    the penultimate, ... (diffusers' clip_skip = CLIP_SKIP - 1)

Serving::

    DEADLINE_MS            INT32 [1]  optional, default the deployment's ``default_deadline_ms`` (0 = none);
                                      1 .. 3,600,000 ms after arrival; the step scheduler serves requests that can
                                      still meet their deadline first
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InvalidRequestError
from .schedulers import canonical_scheduler


@dataclass(frozen=True)
class FieldSpec:
    """One request tensor: its Triton name and dtype, the dataclass attribute, and whether it is required."""

    name: str
    attr: str
    triton_dtype: str
    required: bool = False
    #: A ``[m]`` vector rather than a ``[1]`` scalar.
    vector: bool = False
    #: The tensor's dims in a model config, when not ``[1]`` (scalar) or ``[-1]`` (vector).
    shape: tuple[int, ...] = ()

    @property
    def dims(self) -> tuple[int, ...]:
        return self.shape or ((-1,) if self.vector else (1,))


FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("PROMPT", "prompt", "BYTES", required=True),
    FieldSpec("NEGATIVE_PROMPT", "negative_prompt", "BYTES"),
    FieldSpec("PROMPT_2", "prompt_2", "BYTES"),
    FieldSpec("NEGATIVE_PROMPT_2", "negative_prompt_2", "BYTES"),
    FieldSpec("SEED", "seed", "INT64"),
    FieldSpec("STEPS", "steps", "INT32"),
    FieldSpec("GUIDANCE_SCALE", "guidance_scale", "FP32"),
    FieldSpec("HEIGHT", "height", "INT32"),
    FieldSpec("WIDTH", "width", "INT32"),
    FieldSpec("SCHEDULER", "scheduler", "BYTES"),
    FieldSpec("LORA_NAMES", "lora_names", "BYTES", vector=True),
    FieldSpec("LORA_SCALES", "lora_scales", "FP32", vector=True),
    FieldSpec("LORA_BOUND_K", "lora_bound_k", "INT32"),
    FieldSpec("CONTROLNET_NAMES", "controlnet_names", "BYTES", vector=True),
    FieldSpec("CONTROLNET_IMAGES", "controlnet_images", "UINT8", vector=True, shape=(-1, -1, -1, 3)),
    FieldSpec("CONTROLNET_SCALES", "controlnet_scales", "FP32", vector=True),
    FieldSpec("CONTROLNET_GUIDANCE_START", "controlnet_guidance_start", "FP32", vector=True),
    FieldSpec("CONTROLNET_GUIDANCE_END", "controlnet_guidance_end", "FP32", vector=True),
    FieldSpec("ORIGINAL_SIZE", "original_size", "INT32", vector=True),
    FieldSpec("CROPS_COORDS_TOP_LEFT", "crops_coords_top_left", "INT32", vector=True),
    FieldSpec("TARGET_SIZE", "target_size", "INT32", vector=True),
    FieldSpec("DEADLINE_MS", "deadline_ms", "INT32"),
    FieldSpec("NUM_IMAGES", "num_images", "INT32"),
    FieldSpec("INIT_IMAGE", "init_image", "UINT8", vector=True, shape=(-1, -1, 3)),
    FieldSpec("MASK_IMAGE", "mask_image", "UINT8", vector=True, shape=(-1, -1)),
    FieldSpec("STRENGTH", "strength", "FP32"),
    FieldSpec("CLIP_SKIP", "clip_skip", "INT32"),
)
#: The SDXL micro-conditioning fields (pairs).
SDXL_FIELDS = ("ORIGINAL_SIZE", "CROPS_COORDS_TOP_LEFT", "TARGET_SIZE")
#: Every SDXL-only field, with what it is (for the error an SD model answers it with).
SDXL_ONLY = {
    "PROMPT_2": "the second text encoder's prompt of SDXL models",
    "NEGATIVE_PROMPT_2": "the second text encoder's prompt of SDXL models",
    **dict.fromkeys(SDXL_FIELDS, "SDXL micro-conditioning"),
}
FIELDS_BY_NAME = {f.name: f for f in FIELDS}
#: The request fields ``text_encoder`` consumes (the ensemble maps these ``txt2img`` inputs onto it).
TEXT_ENCODER_INPUTS = (
    "PROMPT",
    "NEGATIVE_PROMPT",
    "PROMPT_2",
    "NEGATIVE_PROMPT_2",
    "GUIDANCE_SCALE",
    "LORA_NAMES",
    "LORA_SCALES",
    "CLIP_SKIP",
)
#: The images of ``img2img`` that ``vae`` encodes (``denoise`` gets their latent distributions instead).
IMAGE_INPUTS = ("INIT_IMAGE", "MASK_IMAGE")
#: What ``vae`` reads of an ``img2img`` request: the images, and the size they must agree with.
VAE_ENCODE_INPUTS = (*IMAGE_INPUTS, "HEIGHT", "WIDTH")
#: The fields only ``img2img`` takes.
IMG2IMG_ONLY = (*IMAGE_INPUTS, "STRENGTH")
#: The request fields ``denoise`` consumes: all but the prompts and the images (besides ``PROMPT_EMBEDS`` from
#: ``text_encoder`` and the images' latent distributions from ``vae``).
DENOISE_INPUTS = tuple(
    f.name
    for f in FIELDS
    if not f.name.startswith(("PROMPT", "NEGATIVE_PROMPT")) and f.name not in (*IMAGE_INPUTS, "CLIP_SKIP")
)
#: The largest ``CLIP_SKIP`` (A1111's slider's end; a text encoder with fewer layers refuses more by name).
MAX_CLIP_SKIP = 12
#: The longest ``DEADLINE_MS`` accepted: one hour.
MAX_DEADLINE_MS = 3_600_000
NUMPY_DTYPES = {"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "UINT8": np.uint8}


@dataclass(frozen=True)
class GenerationRequest:
    """One text-to-image request, validated. ``height``/``width`` of 0 mean the model's native size."""

    prompt: str
    negative_prompt: str | None = None
    #: SDXL: the prompts of the second text encoder (``None``: the same as ``prompt`` / ``negative_prompt``).
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 7.5
    height: int = 0
    width: int = 0
    scheduler: str = "default"
    lora_names: tuple[str, ...] = ()
    lora_scales: tuple[float, ...] = ()
    lora_bound_k: int | None = None
    controlnet_names: tuple[str, ...] = ()
    #: ``[n, H, W, 3]`` uint8 hint images (not compared: arrays have no single truth value).
    controlnet_images: np.ndarray | None = field(default=None, compare=False, repr=False)
    controlnet_scales: tuple[float, ...] = ()
    controlnet_guidance_start: tuple[float, ...] = ()
    controlnet_guidance_end: tuple[float, ...] = ()
    #: SDXL ``add_time_ids`` parts; empty = diffusers' defaults (output size, (0, 0), output size).
    original_size: tuple[int, ...] = ()
    crops_coords_top_left: tuple[int, ...] = ()
    target_size: tuple[int, ...] = ()
    #: Milliseconds from arrival by which the image should be ready (``None``: the deployment's default). The step
    #: scheduler favours requests that can still meet theirs (see ``triton_backend/slo``).
    deadline_ms: int | None = None
    num_images: int = 1
    #: ``img2img``: ``[H, W, 3]`` and ``[H, W]`` uint8 (not compared, as the hints).
    init_image: np.ndarray | None = field(default=None, compare=False, repr=False)
    mask_image: np.ndarray | None = field(default=None, compare=False, repr=False)
    #: ``None``: the default of the diffusers pipeline in use (:func:`default_strength`).
    strength: float | None = None
    #: A1111's "Clip skip": 1 = the text encoder's last layer (diffusers' default), 2 = the penultimate, ...
    clip_skip: int = 1

    def add_time_ids(self, height: int, width: int) -> list[int]:
        """SDXL ``original_size + crops_coords_top_left + target_size`` with diffusers' defaults filled in."""
        return [
            *(self.original_size or (height, width)),
            *(self.crops_coords_top_left or (0, 0)),
            *(self.target_size or (height, width)),
        ]

    @property
    def controlnets(self) -> list[tuple[str, float, float, float]]:
        """``(name, scale, start, end)`` per ControlNet, defaults filled in (1.0, 0.0, 1.0)."""
        n = len(self.controlnet_names)
        scales = self.controlnet_scales or (1.0,) * n
        starts = self.controlnet_guidance_start or (0.0,) * n
        ends = self.controlnet_guidance_end or (1.0,) * n
        return list(zip(self.controlnet_names, scales, starts, ends, strict=True))

    @property
    def loras(self) -> list[tuple[str, float]]:
        """``(name, scale)`` pairs; scales default to 1.0."""
        scales = self.lora_scales or (1.0,) * len(self.lora_names)
        return list(zip(self.lora_names, scales, strict=True))

    @property
    def do_classifier_free_guidance(self) -> bool:
        """diffusers: ``guidance_scale > 1`` runs the unconditional branch too."""
        return self.guidance_scale > 1.0

    def to_tensors(self) -> dict[str, np.ndarray]:
        """The request as ``txt2img`` input tensors (shape ``[1]`` each); unset optional fields are omitted."""
        out: dict[str, np.ndarray] = {}
        for spec in FIELDS:
            value = getattr(self, spec.attr)
            if value is None or (spec.vector and len(value) == 0):
                continue
            if spec.name == "LORA_BOUND_K" and not self.lora_names:
                continue
            if spec.name in ("NUM_IMAGES", "CLIP_SKIP") and value == 1:  # (the defaults: sent only when set)
                continue
            if spec.triton_dtype == "UINT8":
                out[spec.name] = np.ascontiguousarray(value, dtype=np.uint8)
            elif spec.vector:
                values = [v.encode("utf-8") for v in value] if spec.triton_dtype == "BYTES" else list(value)
                out[spec.name] = np.array(values, dtype=NUMPY_DTYPES[spec.triton_dtype])
            elif spec.triton_dtype == "BYTES":
                out[spec.name] = np.array([value.encode("utf-8")], dtype=np.object_)
            else:
                out[spec.name] = np.array([value], dtype=NUMPY_DTYPES[spec.triton_dtype])
        return out


@dataclass(frozen=True)
class RequestLimits:
    """Deployment limits the parser enforces (from the stage's config parameters)."""

    max_steps: int = 150
    max_height: int = 2048
    max_width: int = 2048
    max_prompt_chars: int = 8192
    #: Raw UTF-8 bytes of one prompt field, checked before it is decoded (4 bytes per character at most).
    max_prompt_bytes: int = 4 * 8192
    #: Bytes of ``CONTROLNET_IMAGES`` in one request (default: four hints at 2048 x 2048).
    max_hint_bytes: int = 4 * 2048 * 2048 * 3
    #: Bytes of ``INIT_IMAGE`` (and of ``MASK_IMAGE``) in one request (default: one image at 2048 x 2048).
    max_image_bytes: int = 2048 * 2048 * 3
    max_images: int = 8
    max_loras: int = 8
    size_multiple: int = 8


#: The free-text fields (``max_prompt_chars``, ``max_prompt_bytes``).
PROMPT_FIELDS = ("PROMPT", "NEGATIVE_PROMPT", "PROMPT_2", "NEGATIVE_PROMPT_2")


def parse_request(
    tensors: Mapping[str, Any], limits: RequestLimits | None = None, only: tuple[str, ...] | None = None
) -> GenerationRequest:
    """Build a :class:`GenerationRequest` from input tensors, or raise ``InvalidRequestError(field, reason)``.

    ``only`` restricts parsing to the fields one stage consumes (e.g. ``text_encoder`` needs only the prompts);
    absent fields take their defaults. Required fields are required only when they are in ``only``.
    """
    limits = limits or RequestLimits()
    names = only if only is not None else tuple(f.name for f in FIELDS)
    _check_sizes(tensors, limits, names)
    values: dict[str, Any] = {}
    for name in names:
        spec = FIELDS_BY_NAME[name]
        if name not in tensors or tensors[name] is None:
            if spec.required:
                raise InvalidRequestError(name, "is required")
            continue
        if spec.vector:
            values[spec.attr] = _vector(name, tensors[name], spec.triton_dtype)
        else:
            values[spec.attr] = _scalar(name, tensors[name], spec.triton_dtype)
    if "prompt" not in values:
        values["prompt"] = ""
    request = GenerationRequest(**values)
    _check(request, limits, set(names))
    return request


def _check_sizes(tensors: Mapping[str, Any], limits: RequestLimits, names: tuple[str, ...]) -> None:
    """Refuse oversized inputs before anything is decoded or computed."""
    for name in PROMPT_FIELDS:
        if name in names and tensors.get(name) is not None:
            for item in np.asarray(tensors[name]).reshape(-1)[:1]:
                size = len(item) if isinstance(item, (bytes, np.bytes_)) else len(str(item).encode())
                if size > limits.max_prompt_bytes:
                    raise InvalidRequestError(name, f"{size} bytes; at most {limits.max_prompt_bytes}")
    for name, limit, parameter in (
        ("CONTROLNET_IMAGES", limits.max_hint_bytes, "max_hint_bytes"),
        ("INIT_IMAGE", limits.max_image_bytes, "max_image_bytes"),
        ("MASK_IMAGE", limits.max_image_bytes, "max_image_bytes"),
    ):
        images = tensors.get(name) if name in names else None
        if images is not None and np.asarray(images).nbytes > limit:
            raise InvalidRequestError(name, f"{np.asarray(images).nbytes} bytes; at most {limit} ({parameter})")


def _scalar(name: str, value: Any, triton_dtype: str) -> Any:
    arr = np.asarray(value)
    if arr.size != 1:
        raise InvalidRequestError(name, f"expected exactly one element, got shape {list(arr.shape)}")
    item = arr.reshape(-1)[0]
    if triton_dtype == "BYTES":
        if isinstance(item, (bytes, np.bytes_)):
            try:
                return bytes(item).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequestError(name, "is not valid UTF-8") from None
        if isinstance(item, str):
            return item
        raise InvalidRequestError(name, f"expected BYTES (a string), got {arr.dtype}")
    expected = NUMPY_DTYPES[triton_dtype]
    if arr.dtype != expected:
        raise InvalidRequestError(name, f"expected {triton_dtype}, got {arr.dtype}")
    if name == "STRENGTH":  # the decimal the client meant (0.9, not 0.8999999762): int(STEPS * STRENGTH) counts steps
        return float(str(np.float32(item)))
    return float(item) if triton_dtype == "FP32" else int(item)


def parse_names(tensors: Mapping[str, Any], name: str) -> tuple[str, ...]:
    """A BYTES ``[m]`` input (adapter names) as UTF-8 strings; absent → ``()``. Stages that take only the names
    (``lora_manager``) use this instead of a full :func:`parse_request`.
    """
    return _vector(name, tensors[name], "BYTES") if name in tensors else ()


def _vector(name: str, value: Any, triton_dtype: str) -> Any:
    if triton_dtype == "UINT8":  # images: hints [n, H, W, 3], INIT_IMAGE [H, W, 3], MASK_IMAGE [H, W]
        images, dims = np.asarray(value), FIELDS_BY_NAME[name].dims
        if images.dtype != np.uint8 or images.ndim != len(dims) or (dims[-1] > 0 and images.shape[-1] != dims[-1]):
            shape = {"INIT_IMAGE": "[H, W, 3]", "MASK_IMAGE": "[H, W]"}.get(name, "[n, H, W, 3]")
            raise InvalidRequestError(name, f"expected UINT8 {shape}, got {images.dtype} {list(images.shape)}")
        if name in IMAGE_INPUTS and 0 in images.shape:
            raise InvalidRequestError(name, f"is empty: {list(images.shape)}")
        return images
    arr = np.asarray(value).reshape(-1)
    if triton_dtype == "BYTES":
        return tuple(_scalar(name, arr[i : i + 1], "BYTES") for i in range(arr.size))
    expected = NUMPY_DTYPES[triton_dtype]
    if arr.dtype != expected:
        raise InvalidRequestError(name, f"expected {triton_dtype}, got {arr.dtype}")
    return tuple(float(v) if triton_dtype == "FP32" else int(v) for v in arr)


def _check_loras(req: GenerationRequest, limits: RequestLimits, names: set[str]) -> None:
    if "LORA_NAMES" in names:
        if len(req.lora_names) > limits.max_loras:
            raise InvalidRequestError("LORA_NAMES", f"{len(req.lora_names)} LoRAs; at most {limits.max_loras}")
        if any(not n.strip() for n in req.lora_names):
            raise InvalidRequestError("LORA_NAMES", "names must not be empty")
        if len(set(req.lora_names)) != len(req.lora_names):
            raise InvalidRequestError("LORA_NAMES", "each LoRA may appear once (use LORA_SCALES to weight it)")
    if "LORA_SCALES" in names and req.lora_scales:
        if len(req.lora_scales) != len(req.lora_names):
            raise InvalidRequestError(
                "LORA_SCALES", f"{len(req.lora_scales)} scales for {len(req.lora_names)} LORA_NAMES; counts must agree"
            )
        if not all(math.isfinite(s) and abs(s) <= 16 for s in req.lora_scales):
            raise InvalidRequestError("LORA_SCALES", f"{list(req.lora_scales)}: each must be finite, |s| <= 16")
    if "LORA_BOUND_K" in names and req.lora_bound_k is not None and req.lora_bound_k < 0:
        raise InvalidRequestError("LORA_BOUND_K", f"{req.lora_bound_k} is negative; 0 = patch before the first step")


def _check_controlnets(req: GenerationRequest, names: set[str]) -> None:
    if "CONTROLNET_NAMES" not in names:
        return
    n = len(req.controlnet_names)
    if n > 8:
        raise InvalidRequestError("CONTROLNET_NAMES", f"{n} ControlNets; at most 8")
    images = req.controlnet_images
    if n and images is None:
        raise InvalidRequestError("CONTROLNET_IMAGES", f"required with CONTROLNET_NAMES ({n} hint images)")
    if images is not None and images.shape[0] != n:
        raise InvalidRequestError(
            "CONTROLNET_IMAGES", f"{images.shape[0]} images for {n} CONTROLNET_NAMES; counts must agree"
        )
    for field_name, values in (
        ("CONTROLNET_SCALES", req.controlnet_scales),
        ("CONTROLNET_GUIDANCE_START", req.controlnet_guidance_start),
        ("CONTROLNET_GUIDANCE_END", req.controlnet_guidance_end),
    ):
        if values and len(values) != n:
            raise InvalidRequestError(field_name, f"{len(values)} values for {n} CONTROLNET_NAMES; counts must agree")
        if not all(math.isfinite(v) for v in values):
            raise InvalidRequestError(field_name, f"{list(values)}: must be finite")
    for name, scale, start, end in req.controlnets:
        if not 0.0 <= start < end <= 1.0:
            raise InvalidRequestError(
                "CONTROLNET_GUIDANCE_START", f"{name}: need 0 <= start < end <= 1, got {start}, {end}"
            )
        if abs(scale) > 16:
            raise InvalidRequestError("CONTROLNET_SCALES", f"{name}: |{scale}| > 16")


def reject_sdxl_only(req: GenerationRequest, arch_label: str, names: tuple[str, ...] = tuple(SDXL_ONLY)) -> None:
    """On a model without SDXL conditioning: any of ``names`` given raises ``InvalidRequestError`` naming it."""
    for name in names:
        if getattr(req, FIELDS_BY_NAME[name].attr) not in (None, ()):
            raise InvalidRequestError(name, f"is {SDXL_ONLY[name]}; this model is {arch_label}")


def _check_sdxl(req: GenerationRequest, limits: RequestLimits, names: set[str]) -> None:
    for name in SDXL_FIELDS:
        if name not in names:
            continue
        values = getattr(req, FIELDS_BY_NAME[name].attr)
        if not values:
            continue
        if len(values) != 2:
            raise InvalidRequestError(name, f"expected 2 values, got {len(values)}")
        if name == "CROPS_COORDS_TOP_LEFT":
            low, high = 0, max(limits.max_height, limits.max_width)
        else:
            low, high = 1, 4 * max(limits.max_height, limits.max_width)
        if not all(low <= v <= high for v in values):
            raise InvalidRequestError(name, f"{list(values)}: each value must be in {low} .. {high}")


def _check_images(req: GenerationRequest, limits: RequestLimits, names: set[str]) -> None:
    if "NUM_IMAGES" in names and not 1 <= req.num_images <= limits.max_images:
        raise InvalidRequestError(
            "NUM_IMAGES", f"{req.num_images} is out of range; allowed 1 .. {limits.max_images} (max_images)"
        )
    if "STRENGTH" in names and req.strength is not None and not 0.0 < req.strength <= 1.0:
        raise InvalidRequestError("STRENGTH", f"{req.strength} is out of range; allowed (0, 1]")
    if "INIT_IMAGE" not in names:
        return
    if req.init_image is None:
        if req.mask_image is not None:
            raise InvalidRequestError("MASK_IMAGE", "needs INIT_IMAGE (the image to inpaint)")
        return
    height, width = req.init_image.shape[:2]
    for name, value, maximum, given in (
        ("HEIGHT", height, limits.max_height, req.height),
        ("WIDTH", width, limits.max_width, req.width),
    ):
        if value % limits.size_multiple or value > maximum:
            raise InvalidRequestError(
                "INIT_IMAGE", f"{name.lower()} {value} must be a multiple of {limits.size_multiple} up to {maximum}"
            )
        if given and given != value:
            raise InvalidRequestError(name, f"{given} differs from INIT_IMAGE's {value}; omit it or make them equal")
    if req.mask_image is not None and req.mask_image.shape != (height, width):
        raise InvalidRequestError(
            "MASK_IMAGE", f"{list(req.mask_image.shape)} differs from INIT_IMAGE's [{height}, {width}]"
        )


def default_strength(is_sdxl: bool, inpainting: bool, controlnet: bool = False) -> float:
    """The ``strength`` default of the diffusers pipeline a request stands for (their ``__call__`` signatures):
    ``StableDiffusion[XL][ControlNet]{Img2Img,Inpaint}Pipeline``.
    """
    if is_sdxl:
        return 0.9999 if inpainting else 0.8 if controlnet else 0.3
    return 1.0 if inpainting else 0.8


def _check(req: GenerationRequest, limits: RequestLimits, names: set[str]) -> None:
    if "PROMPT" in names:
        if not req.prompt.strip():
            raise InvalidRequestError("PROMPT", "must not be empty")
        if len(req.prompt) > limits.max_prompt_chars:
            raise InvalidRequestError("PROMPT", f"{len(req.prompt)} characters; at most {limits.max_prompt_chars}")
    for name in PROMPT_FIELDS[1:]:
        value = getattr(req, name.lower())
        if value is not None and len(value) > limits.max_prompt_chars:
            raise InvalidRequestError(name, f"{len(value)} characters; at most {limits.max_prompt_chars}")
    if not 1 <= req.steps <= limits.max_steps:
        raise InvalidRequestError("STEPS", f"{req.steps} is out of range; allowed 1 .. {limits.max_steps}")
    if not math.isfinite(req.guidance_scale) or not 0.0 <= req.guidance_scale <= 100.0:
        raise InvalidRequestError("GUIDANCE_SCALE", f"{req.guidance_scale} is out of range; allowed 0 .. 100")
    if req.seed < 0:
        raise InvalidRequestError("SEED", f"{req.seed} is negative; allowed 0 .. 2**63-1")
    for name, value, maximum in (("HEIGHT", req.height, limits.max_height), ("WIDTH", req.width, limits.max_width)):
        if value == 0:
            continue  # the model's native size
        if value < 0 or value % limits.size_multiple:
            raise InvalidRequestError(name, f"{value} must be a positive multiple of {limits.size_multiple}")
        if value > maximum:
            raise InvalidRequestError(name, f"{value} exceeds the configured maximum {maximum}")
    _check_loras(req, limits, names)
    _check_controlnets(req, names)
    _check_sdxl(req, limits, names)
    _check_images(req, limits, names)
    if "CLIP_SKIP" in names and not 1 <= req.clip_skip <= MAX_CLIP_SKIP:
        raise InvalidRequestError(
            "CLIP_SKIP", f"{req.clip_skip} is out of range; allowed 1 (the last layer) .. {MAX_CLIP_SKIP}"
        )
    if req.deadline_ms is not None and not 1 <= req.deadline_ms <= MAX_DEADLINE_MS:
        raise InvalidRequestError(
            "DEADLINE_MS", f"{req.deadline_ms} is out of range; allowed 1 .. {MAX_DEADLINE_MS} (milliseconds)"
        )
    canonical_scheduler(req.scheduler)


def field_names() -> list[str]:
    """Names of every ``txt2img`` input, in schema order."""
    return [f.name for f in FIELDS]


def encode_json_rows(triples: Sequence[tuple[str, str, float]], rows: int) -> np.ndarray:
    """``[rows, 1]`` BYTES: ``[[name, file, scale], ...]`` as JSON, repeated per row (Triton batches by row).

    Carries a request's LoRA set (``ADAPTERS``) and a step's ControlNets (``CONTROLNETS``) to ``unet``.
    """
    text = json.dumps([[n, f, s] for n, f, s in triples]).encode()
    return np.array([[text]] * rows, dtype=np.object_)


def decode_json_rows(value: np.ndarray, field: str) -> tuple[tuple[str, str, float], ...]:
    """Inverse of :func:`encode_json_rows`; every row of one request must carry the same list."""
    rows = {bytes(v) for v in np.asarray(value).reshape(-1)}
    if len(rows) != 1:
        raise InvalidRequestError(field, "all rows of one request must carry the same list")
    try:
        return tuple((str(n), str(f), float(s)) for n, f, s in json.loads(rows.pop()))
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(field, f"not a JSON list of [name, file, scale]: {exc}") from None
