"""Stage ``denoise``: the step loop (scheduler + classifier-free guidance), as ``StableDiffusionPipeline.__call__``
(and ``StableDiffusionXLPipeline.__call__``: SDXL steps carry the pooled embeddings and time ids as added
conditioning).

The loop is written against a ``UNetFn`` so the same code runs in-process (tests, against diffusers) and inside
Triton, where ``UNetFn`` is a BLS call to the ``unet`` model. All request state lives in a :class:`DenoiseState`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..config import StageConfig
from ..controlnet.service import HINT_DIR_PREFIX
from ..controlnet.wire import ControlRef
from ..errors import CancelledError, InvalidRequestError
from ..lora.patch import AdapterRef
from ..model_info import ModelInfo
from ..schedulers import make_scheduler
from ..schema import DENOISE_INPUTS, SDXL_FIELDS, GenerationRequest, default_strength, parse_request, reject_sdxl_only
from ..slo.engine import StepScheduler
from ..slo.policy import Job, deadline_from

#: Request fields this stage consumes, besides ``PROMPT_EMBEDS`` from ``text_encoder``.
INPUTS = DENOISE_INPUTS

Adapters = tuple[AdapterRef, ...]
#: ControlNets of one step, each with its effective scale.
Controls = tuple[ControlRef, ...]

#: SDXL's added conditioning of a UNet call, per row: ``{"text_embeds": [B, P], "time_ids": [B, 6]}`` (diffusers'
#: ``added_cond_kwargs``); empty for SD 1.x/2.x.
Added = dict[str, torch.Tensor]
#: ``(sample [B, C, h, w], timestep [B], encoder_hidden_states [B, S, D], adapters, controls, added)
#: -> noise_pred [B, C, h, w]``; ``adapters`` is the LoRA set the UNet must have patched in for this step (empty =
#: the base weights), ``controls`` the step's ControlNets.
UNetCall = tuple[torch.Tensor, torch.Tensor, torch.Tensor, Adapters, Controls, Added]
UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Adapters, Controls, Added], Any]
#: Several independent UNet calls, run concurrently: ``[(sample, timestep, hidden, ...), ...] -> [noise_pred]``.
#: Both may be async (return awaitables): the loop awaits them (:func:`run_async`).
UNetManyFn = Callable[[list[UNetCall]], Any]


class LoraLoad(Protocol):
    """An in-flight LoRA load (a ``concurrent.futures.Future`` in Triton): ``result()`` blocks, raises on failure."""

    def done(self) -> bool: ...

    def result(self) -> Adapters: ...


def latent_parallel(unet_many: UNetManyFn) -> UNetFn:
    """Latent parallelism (xDiT's "CFG parallel"; ``docs/architecture.md``): the unconditional and conditional rows of a
    classifier-free-guidance step are independent, so they go out as two concurrent batch-1 UNet calls (two
    instances/devices) and only the two noise predictions come back; :func:`apply_step` then combines
    ``u + g·(c − u)`` exactly as for one batch-2 call. A batch-1 step (no guidance) is passed through.
    """

    def unet(
        sample: torch.Tensor,
        timestep: torch.Tensor,
        hidden: torch.Tensor,
        adapters: Adapters,
        controls: Controls,
        added: Added,
    ):
        if sample.shape[0] == 1:
            return _then(unet_many([(sample, timestep, hidden, adapters, controls, added)]), lambda out: out[0])
        rows = [
            (
                sample[i : i + 1],
                timestep[i : i + 1],
                hidden[i : i + 1],
                adapters,
                controls,
                {k: v[i : i + 1] for k, v in added.items()},
            )
            for i in range(sample.shape[0])
        ]
        return _then(unet_many(rows), torch.cat)

    return unet


def _then(value: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn(value)``, or, when ``value`` is awaitable (an async UNet call), a coroutine that awaits it first."""
    if inspect.isawaitable(value):

        async def later() -> Any:
            return fn(await value)

        return later()
    return fn(value)


@dataclass
class Inpainting:
    """What an inpainting request steps with, one row per image: the mask at the latent size ``[1, 1, h, w]``
    (1 = repaint); for a 4-channel UNet the image's latents and the initial noise (blended back after each step);
    for a 9-channel inpainting UNet the masked image's latents (concatenated to its input).
    """

    mask: torch.Tensor
    image_latents: torch.Tensor | None
    noise: torch.Tensor
    masked_latents: torch.Tensor | None


@dataclass
class DenoiseState:
    """Everything one generation request owns during denoising (never stored on a shared object).

    Its ``NUM_IMAGES`` images are rows of ``latents``, each with its own scheduler and generator (image i is seeded
    ``SEED + i``, so it equals the request for that seed alone); they step together in one UNet batch.
    """

    request: GenerationRequest
    schedulers: list[SchedulerMixin]
    generators: list[torch.Generator]
    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    timesteps: torch.Tensor
    extra_step_kwargs: dict[str, Any] = field(default_factory=dict)
    #: The scheduler's ``step`` draws noise (stochastic samplers): each image's generator is passed to it.
    step_takes_generator: bool = False
    inpainting: Inpainting | None = None
    #: SDXL: pooled text embeddings and time ids, one row per UNet row (empty for SD 1.x/2.x).
    added: Added = field(default_factory=dict)
    step_index: int = 0
    #: Bounded asynchronous LoRA loading: the load in flight, the step by which it must land, where it landed.
    lora_load: LoraLoad | None = None
    bound_k: int = 0
    adapters: Adapters = ()
    landed_step: int = -1
    #: ControlNets: ``(name, hint_file, scale, guidance_start, guidance_end)``; hint files are this request's.
    controlnets: list[tuple[str, str, float, float, float]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.timesteps)

    @property
    def scheduler(self) -> SchedulerMixin:
        """The first image's scheduler (every image's has the same timesteps)."""
        return self.schedulers[0]


def resolve_size(request: GenerationRequest, info: ModelInfo, images: Images | None = None) -> tuple[int, int]:
    """Height and width in pixels: the init image's, else the request's; 0 means the model's native size; must be
    a multiple of the VAE factor.
    """
    if images is not None:
        _, _, h, w = images["INIT_MOMENTS"].shape
        return h * info.vae_scale_factor, w * info.vae_scale_factor
    height = request.height or info.native_size
    width = request.width or info.native_size
    for name, value in (("HEIGHT", height), ("WIDTH", width)):
        if value % info.vae_scale_factor:
            raise InvalidRequestError(name, f"{value} must be a multiple of {info.vae_scale_factor}")
    return height, width


def added_conditioning(
    request: GenerationRequest, pooled_embeds: torch.Tensor | None, info: ModelInfo, rows: int, size: tuple[int, int]
) -> Added:
    """SDXL: ``text_embeds`` = the pooled embeddings, ``time_ids`` = ``original_size + crops + target_size`` (output
    ``size`` = (height, width) where absent) for
    every row (diffusers' negative time ids default to the positive ones). SD 1.x/2.x: none, and SDXL-only
    fields are rejected.
    """
    if not info.is_sdxl:
        reject_sdxl_only(request, info.arch_label, SDXL_FIELDS)
        return {}
    if pooled_embeds is None or pooled_embeds.shape != (rows, info.pooled_dim):
        got = None if pooled_embeds is None else list(pooled_embeds.shape)
        raise InvalidRequestError(
            "POOLED_EMBEDS", f"expected [{rows}, {info.pooled_dim}] for this SDXL model, got {got}"
        )
    time_ids = torch.tensor([request.add_time_ids(*size)], dtype=torch.float32).repeat(rows, 1)
    return {"text_embeds": pooled_embeds.float(), "time_ids": time_ids}


#: ``img2img``: the images' latent distributions from ``vae`` (``INIT_MOMENTS``; with a mask ``MASKED_MOMENTS`` and
#: ``LATENT_MASK``), as tensors.
Images = dict[str, torch.Tensor]
IMAGE_TENSORS = ("INIT_MOMENTS", "MASKED_MOMENTS", "LATENT_MASK")


def prepare(
    request: GenerationRequest,
    prompt_embeds: torch.Tensor,
    info: ModelInfo,
    pooled_embeds: torch.Tensor | None = None,
    images: Images | None = None,
) -> DenoiseState:
    """Timesteps, initial latents and per-image schedulers and generators, in diffusers' order (timesteps before
    noise; img2img: after ``STRENGTH``, the image's latents before the noise; inpainting: the masked image's latents
    after them), each image as its request alone would (:func:`first_latents`).
    """
    expected = 2 if request.do_classifier_free_guidance else 1
    if (
        prompt_embeds.ndim != 3
        or prompt_embeds.shape[0] != expected
        or prompt_embeds.shape[2] != info.cross_attention_dim
    ):
        raise InvalidRequestError(
            "PROMPT_EMBEDS",
            f"expected [{expected}, S, {info.cross_attention_dim}] for guidance_scale={request.guidance_scale}, "
            f"got {list(prompt_embeds.shape)}",
        )
    if images is None and request.strength is not None:
        raise InvalidRequestError("STRENGTH", "applies to img2img only (with INIT_IMAGE)")
    if images is None and info.inpainting_unet:
        raise InvalidRequestError(
            "INIT_IMAGE", "this model's UNet is an inpainting UNet: send INIT_IMAGE and MASK_IMAGE"
        )
    if images is not None and info.inpainting_unet and "MASKED_MOMENTS" not in images:
        raise InvalidRequestError("MASK_IMAGE", "this model's UNet is an inpainting UNet: a mask is required")
    height, width = resolve_size(request, info, images)
    added = added_conditioning(request, pooled_embeds, info, expected, (height, width))
    n = request.num_images
    schedulers = [make_scheduler(request.scheduler, info.scheduler_config, seed=request.seed + i) for i in range(n)]
    try:
        for scheduler in schedulers:
            scheduler.set_timesteps(request.steps, device="cpu")
    except ValueError as exc:  # e.g. PNDM's Runge-Kutta warm-up needs >= 4 steps (diffusers fails the same way)
        raise InvalidRequestError(
            "STEPS", f"{request.steps} steps are too few for the {type(schedulers[0]).__name__} scheduler ({exc})"
        ) from None
    timesteps, strength = schedulers[0].timesteps, None
    if images is not None:
        strength = request.strength
        if strength is None:
            strength = default_strength(info.is_sdxl, "LATENT_MASK" in images, bool(request.controlnet_names))
        timesteps = strength_timesteps(request.steps, strength, schedulers)
    generators = [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(n)]
    shape = (1, info.latent_channels, height // info.vae_scale_factor, width // info.vae_scale_factor)
    rows = [
        first_latents(s, g, shape, timesteps, info, strength, images)
        for s, g in zip(schedulers, generators, strict=True)
    ]
    latents = torch.cat([r[0] for r in rows])
    inpainting = None
    if images is not None and "LATENT_MASK" in images:
        noise = torch.cat([r[1] for r in rows])
        known = [r[3] if info.inpainting_unet else r[2] for r in rows]
        assert all(t is not None for t in known)  # (first_latents draws what this UNet kind needs)
        latents_of = torch.cat(cast(list[torch.Tensor], known))
        if info.inpainting_unet:
            inpainting = Inpainting(images["LATENT_MASK"].float(), None, noise, latents_of)
        else:
            inpainting = Inpainting(images["LATENT_MASK"].float(), latents_of, noise, None)
    params = set(inspect.signature(schedulers[0].step).parameters)
    extra: dict[str, Any] = {"eta": 0.0} if "eta" in params else {}
    if n > 1:  # diffusers' num_images_per_prompt order: every unconditional row, then every conditional one
        prompt_embeds = prompt_embeds.repeat_interleave(n, dim=0)
        added = {k: v.repeat_interleave(n, dim=0) for k, v in added.items()}
    return DenoiseState(
        request,
        schedulers,
        generators,
        latents,
        prompt_embeds.float(),
        timesteps,
        extra,
        step_takes_generator="generator" in params,
        inpainting=inpainting,
        added=added,
    )


def strength_timesteps(steps: int, strength: float, schedulers: list[SchedulerMixin]) -> torch.Tensor:
    """The timesteps ``STRENGTH`` leaves (the img2img pipelines' ``get_timesteps``): the last
    ``int(STEPS * STRENGTH)`` steps' worth; each scheduler starts there (``set_begin_index``).
    """
    t_start = steps - min(int(steps * strength), steps)
    if steps - t_start < 1:
        raise InvalidRequestError(
            "STRENGTH", f"{strength} of {steps} STEPS leaves no step to run; raise STRENGTH or STEPS"
        )
    for scheduler in schedulers:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
    return schedulers[0].timesteps[t_start * schedulers[0].order :]


def first_latents(
    scheduler: SchedulerMixin,
    generator: torch.Generator,
    shape: tuple[int, ...],
    timesteps: torch.Tensor,
    info: ModelInfo,
    strength: float | None,
    images: Images | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One image's ``(latents, noise, image latents, masked image latents)`` as its diffusers pipeline draws them
    with its generator: txt2img noise; img2img the image's latents (sampled), then noise added at the first
    timestep; inpainting as ``StableDiffusion(XL)InpaintPipeline``: the image's latents (unless a 9-channel UNet at
    strength 1), the noise, then the masked image's latents.
    """
    if images is None:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return noise * scheduler.init_noise_sigma, noise, None, None
    inpainting = "LATENT_MASK" in images
    pure_noise = inpainting and strength == 1.0
    image_latents = None
    if not (pure_noise and info.inpainting_unet):
        image_latents = sample_latents(images["INIT_MOMENTS"], generator, info, normalize=not inpainting)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if pure_noise:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, timesteps[:1])
    masked = sample_latents(images["MASKED_MOMENTS"], generator, info, normalize=False) if inpainting else None
    return latents, noise, image_latents, masked


def sample_latents(moments: torch.Tensor, generator: torch.Generator, info: ModelInfo, normalize: bool) -> torch.Tensor:
    """A draw from the VAE's latent distribution (diffusers' ``retrieve_latents``, mode ``sample``), scaled as the
    pipelines do: by ``scaling_factor``; SDXL img2img with a VAE that has ``latents_mean``/``latents_std``
    (``normalize``) also normalizes with them.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    latents = DiagonalGaussianDistribution(moments.float()).sample(generator)
    if normalize and info.is_sdxl and info.latents_mean is not None and info.latents_std is not None:
        mean = torch.tensor(info.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(info.latents_std).view(1, -1, 1, 1)
        return (latents - mean) * info.scaling_factor / std
    return info.scaling_factor * latents


def prepare_encoded(request: GenerationRequest, encoded: dict[str, np.ndarray], info: ModelInfo) -> DenoiseState:
    """:func:`prepare` from ``text_encoder``'s outputs: ``PROMPT_EMBEDS`` and (SDXL) ``POOLED_EMBEDS``, FP32; and
    for ``img2img`` from ``vae``'s (:data:`IMAGE_TENSORS`).
    """
    tensors = {}
    for name in ("PROMPT_EMBEDS", "POOLED_EMBEDS", *IMAGE_TENSORS):
        value = encoded.get(name)
        if value is None:
            if name == "PROMPT_EMBEDS":
                raise InvalidRequestError(name, "is required")
            continue
        if value.dtype != np.float32:
            raise InvalidRequestError(name, f"expected FP32, got {value.dtype}")
        tensors[name] = torch.from_numpy(np.array(value))
    images = {k: tensors[k] for k in IMAGE_TENSORS if k in tensors} or None
    if images is not None:
        check_images(images, info)
    return prepare(request, tensors["PROMPT_EMBEDS"], info, tensors.get("POOLED_EMBEDS"), images)


def check_images(images: Images, info: ModelInfo) -> None:
    """``INIT_MOMENTS [1, 2C, h, w]``; with a mask ``MASKED_MOMENTS`` (the same) and ``LATENT_MASK [1, 1, h, w]``."""
    moments = images.get("INIT_MOMENTS")
    if moments is None or moments.ndim != 4 or moments.shape[:2] != (1, 2 * info.latent_channels):
        got = None if moments is None else list(moments.shape)
        raise InvalidRequestError("INIT_MOMENTS", f"expected [1, {2 * info.latent_channels}, h, w], got {got}")
    h, w = moments.shape[2:]
    if ("MASKED_MOMENTS" in images) != ("LATENT_MASK" in images):
        raise InvalidRequestError("LATENT_MASK", "MASKED_MOMENTS and LATENT_MASK come together (a mask's)")
    for name, shape in (("MASKED_MOMENTS", tuple(moments.shape)), ("LATENT_MASK", (1, 1, h, w))):
        if name in images and tuple(images[name].shape) != shape:
            raise InvalidRequestError(name, f"expected {list(shape)}, got {list(images[name].shape)}")


def attach_loras(state: DenoiseState, load: LoraLoad, bound_k: int) -> None:
    """Start bounded asynchronous loading: the LoRAs land as soon as ``load`` is done, by step ``bound_k`` at the
    latest (clamped to the last step); ``bound_k = 0`` patches before the first step.
    """
    state.lora_load = load
    state.bound_k = max(0, min(bound_k, len(state.timesteps) - 1))


def controlnet_hints(state: DenoiseState, info: ModelInfo) -> list[tuple[str, np.ndarray]]:
    """``(name, hint image)`` per ControlNet of the request, the images checked against the output size."""
    request = state.request
    _, _, h, w = state.latents.shape
    height, width = h * info.vae_scale_factor, w * info.vae_scale_factor
    images = request.controlnet_images
    if images is None or images.shape[1:] != (height, width, 3):
        got = None if images is None else list(images.shape[1:])
        raise InvalidRequestError(
            "CONTROLNET_IMAGES", f"hint images must be [{height}, {width}, 3] (the output size), got {got}"
        )
    return [(name, images[i]) for i, (name, *_) in enumerate(request.controlnets)]


def attach_controlnets(
    state: DenoiseState, prepare_hints: Callable[[list[tuple[str, np.ndarray]]], Any], info: ModelInfo
) -> Any:
    """Check the hint images, then have every hint embedded once (``prepare_hints`` → one file per hint; when it is
    async, this returns a coroutine to await).
    """

    def attach(files: list[str]) -> None:
        state.controlnets = [
            (name, f, scale, start, end)
            for (name, scale, start, end), f in zip(state.request.controlnets, files, strict=True)
        ]

    return _then(prepare_hints(controlnet_hints(state, info)), attach)


def release_hints(state: DenoiseState) -> None:
    """Free this request's hint embeddings (also after a failure or cancellation)."""
    for _, file, *_ in state.controlnets:
        path = Path(file)
        if path.parent.name.startswith(HINT_DIR_PREFIX):
            path.unlink(missing_ok=True)
    state.controlnets = []


def poll_loras(state: DenoiseState) -> None:
    """At the start of a step: take the loaded LoRAs if ready; at step ``bound_k`` wait for them."""
    if state.lora_load is None or state.landed_step >= 0:
        return
    if state.step_index >= state.bound_k or state.lora_load.done():
        state.adapters = tuple(state.lora_load.result())
        state.landed_step = state.step_index


def step_controlnets(state: DenoiseState) -> Controls:
    """The current step's ControlNets with diffusers' ``controlnet_keep`` applied: outside its [start, end] window a
    ControlNet's scale is 0, and it is skipped (adding zero residuals would not change the result).
    """
    i, n = state.step_index, len(state.timesteps)
    out = []
    for name, hint, scale, start, end in state.controlnets:
        keep = 1.0 - float(i / n < start or (i + 1) / n > end)
        if scale * keep != 0.0:
            out.append(ControlRef(name, hint, scale * keep))
    return tuple(out)


def model_input(state: DenoiseState) -> UNetCall:
    """The UNet inputs of the current step: its n images' rows, twice (every unconditional row, then every
    conditional one) with guidance; a 9-channel inpainting UNet also gets the mask and the masked image's latents.
    """
    t = state.timesteps[state.step_index]
    rows = [s.scale_model_input(state.latents[i : i + 1], t) for i, s in enumerate(state.schedulers)]
    sample = torch.cat(rows) if len(rows) > 1 else rows[0]
    inpainting = state.inpainting
    if inpainting is not None and inpainting.masked_latents is not None:
        mask = inpainting.mask.expand(sample.shape[0], -1, -1, -1)
        sample = torch.cat([sample, mask, inpainting.masked_latents], dim=1)
    if state.request.do_classifier_free_guidance:
        sample = torch.cat([sample] * 2)
    timestep = t.reshape(1).float().expand(sample.shape[0]).contiguous()
    return sample, timestep, state.prompt_embeds, state.adapters, step_controlnets(state), state.added


def apply_step(state: DenoiseState, noise_pred: torch.Tensor) -> None:
    """Guidance ``u + g·(c − u)`` then ``scheduler.step``; advances the state by one step."""
    if state.request.do_classifier_free_guidance:
        uncond, cond = noise_pred.chunk(2)
        noise_pred = uncond + state.request.guidance_scale * (cond - uncond)
    t = state.timesteps[state.step_index]
    rows = []
    for i, (scheduler, generator) in enumerate(zip(state.schedulers, state.generators, strict=True)):
        kwargs = state.extra_step_kwargs | ({"generator": generator} if state.step_takes_generator else {})
        rows.append(scheduler.step(noise_pred[i : i + 1], t, state.latents[i : i + 1], **kwargs, return_dict=False)[0])
    state.latents = torch.cat(rows) if len(rows) > 1 else rows[0]
    if state.inpainting is not None and state.inpainting.image_latents is not None:
        blend_known(state)
    state.step_index += 1


def blend_known(state: DenoiseState) -> None:
    """Inpainting on a 4-channel UNet, after each step (``StableDiffusionInpaintPipeline``): the part to keep is the
    image's latents noised to the next timestep (the last step: the image's latents), the masked part the step's.
    """
    inpainting = state.inpainting
    assert inpainting is not None and inpainting.image_latents is not None
    known = inpainting.image_latents
    if state.step_index < len(state.timesteps) - 1:
        after = state.timesteps[state.step_index + 1 : state.step_index + 2]
        known = torch.cat(
            [s.add_noise(known[i : i + 1], inpainting.noise[i : i + 1], after) for i, s in enumerate(state.schedulers)]
        )
    state.latents = (1 - inpainting.mask) * known + inpainting.mask * state.latents


async def run_async(
    state: DenoiseState,
    unet: UNetFn,
    on_step: Callable[[DenoiseState], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    wait: Callable[[Awaitable[Any]], Awaitable[Any]] | None = None,
) -> np.ndarray:
    """Run every remaining step; returns ``LATENTS [1, C, h, w]`` float32. ``unet`` may be sync or async; ``wait``
    wraps waiting for the LoRAs at step ``bound_k`` (the step scheduler frees the request's slot meanwhile).
    """
    while not state.done:
        if is_cancelled is not None and is_cancelled():
            raise CancelledError(f"cancelled by the client at step {state.step_index}")
        await wait_for_loras(state, wait)
        poll_loras(state)
        noise_pred = unet(*model_input(state))
        apply_step(state, await noise_pred if inspect.isawaitable(noise_pred) else noise_pred)
        if on_step is not None:
            on_step(state)
    return state.latents.numpy()


def run(
    state: DenoiseState,
    unet: UNetFn,
    on_step: Callable[[DenoiseState], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
) -> np.ndarray:
    """:func:`run_async` from synchronous code (in-process pipelines, tests)."""
    return asyncio.run(run_async(state, unet, on_step, is_cancelled))


async def wait_for_loras(state: DenoiseState, wait: Callable[[Awaitable[Any]], Awaitable[Any]] | None = None) -> None:
    """At step ``bound_k`` an unfinished asynchronous load (an awaitable) is awaited without blocking the loop."""
    load = state.lora_load
    if not inspect.isawaitable(load) or state.landed_step >= 0 or state.step_index < state.bound_k or load.done():
        return  # (a load that is not awaitable, e.g. in-process, is polled by poll_loras as it is)
    with contextlib.suppress(Exception):  # its error is raised by poll_loras' result()
        await (wait(load) if wait is not None else load)


def step_cost(state: DenoiseState) -> float:
    """Relative cost of one step, for the step scheduler: UNet rows x latent pixels x (1 + ControlNets)."""
    rows = (2 if state.request.do_classifier_free_guidance else 1) * state.latents.shape[0]
    _, _, h, w = state.latents.shape
    return float(rows * h * w * (1 + len(state.request.controlnet_names)))


class Denoiser:
    """The ``denoise`` stage of one model instance: parses its fields, owns no per-request state."""

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg
        self.info = ModelInfo.read(cfg.model_dir)
        self.limits = dataclasses.replace(cfg.limits, size_multiple=self.info.vae_scale_factor)
        #: Admission and order of every generation of this instance (config max_active, max_pending, ...).
        self.scheduler = StepScheduler.from_params(cfg.params)

    def start(self, tensors: dict[str, np.ndarray]) -> DenoiseState:
        """Validate the request fields and ``PROMPT_EMBEDS``; returns the request's fresh state."""
        return prepare_encoded(parse_request(tensors, self.limits, only=INPUTS), tensors, self.info)

    async def generate(
        self,
        tensors: dict[str, np.ndarray],
        unet: UNetFn,
        arrival: float,
        load_loras: Callable[[list[tuple[str, float]]], LoraLoad] | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        prepare_hints: Callable[[list[tuple[str, np.ndarray]]], Any] | None = None,
        on_step: Callable[[DenoiseState], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Triton entry: request fields + ``PROMPT_EMBEDS`` → ``LATENTS`` and ``LORA_LANDED_STEP`` (-1: no LoRA).

        The generation waits for the step scheduler before its first step and before every step after it
        (:mod:`triton_backend.slo`); with LoRAs, ``load_loras`` starts their load at once, so it overlaps the wait.
        """
        state = self.start(tensors)
        request = state.request
        if request.lora_names and load_loras is None:
            raise InvalidRequestError("LORA_NAMES", "this deployment has no lora_manager")
        if request.controlnet_names and prepare_hints is None:
            raise InvalidRequestError("CONTROLNET_NAMES", "this deployment has no controlnet model")
        deadline = deadline_from(arrival, request.deadline_ms, self.scheduler.default_deadline_ms)
        job = Job(arrival, deadline, len(state.timesteps), step_cost(state))
        if request.lora_names and load_loras is not None:
            k = request.lora_bound_k if request.lora_bound_k is not None else self.default_bound_k(len(state.timesteps))
            attach_loras(state, load_loras(request.loras), k)
        try:
            async with self.scheduler.generation(job):
                if request.controlnet_names and prepare_hints is not None:
                    await self.scheduler.outside(job, attach_controlnets(state, prepare_hints, self.info))

                def step(*call: Any) -> Any:
                    return self.scheduler.step(job, lambda: unet(*call))

                def wait(awaitable: Awaitable[Any]) -> Awaitable[Any]:
                    return self.scheduler.outside(job, awaitable)

                latents = await run_async(state, step, on_step, is_cancelled=is_cancelled, wait=wait)
        finally:
            release_hints(state)
            if state.lora_load is not None and isinstance(state.lora_load, asyncio.Future):
                state.lora_load.cancel()  # refused or failed before the LoRAs landed: stop waiting for them
        return {"LATENTS": latents, "LORA_LANDED_STEP": np.array([state.landed_step], dtype=np.int32)}

    def default_bound_k(self, steps: int) -> int:
        """Config ``lora_bound_k``: an integer, or ``auto`` = 40% of the steps (the artifact's K = 20 of 50)."""
        bound = self.cfg.params["lora_bound_k"]
        return round(0.4 * steps) if bound == "auto" else int(bound)
