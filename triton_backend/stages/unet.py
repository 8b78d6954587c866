"""Stage ``unet``: one denoising step of one or more branches, batched across generation requests.

Each row of a batch carries its own timestep (``TIMESTEP [B]``), so step requests of different generation
requests — at different timesteps, seeds and schedulers — can share one forward pass (step-level batching).
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..config import StageConfig
from ..controlnet.unet_split import FrozenHalves, decoder_half, encoder_half, unpack_residuals
from ..controlnet.wire import ControlRef, decode_controlnets
from ..errors import InvalidRequestError
from ..frozen import example_step
from ..lora.patch import AdapterRef, WeightPatcher, adapter_key
from ..lora.wire import decode_adapters
from ..model_info import ModelInfo, load_part
from ..serving.events import enabled as trace_enabled
from ..serving.events import trace

#: Waits for the packed ``[b, N]`` residuals of a step's ControlNets (one tensor per ControlNet).
ResidualsWait = Callable[[], list[torch.Tensor]]
#: Starts the ControlNet requests of one step and returns their :data:`ResidualsWait`.
ControlFn = Callable[["StepInput"], ResidualsWait]


@dataclass
class StepInput:
    """One ``unet`` request: ``sample [b, C, h, w]``, ``timestep [b]``, ``encoder_hidden_states [b, S, D]``."""

    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    #: The LoRA set this step must run with (empty = base weights); rows with different sets never share a pass.
    adapters: tuple[AdapterRef, ...] = ()
    #: ControlNets of this step; their residuals are per row, so rows with different ControlNets still share the
    #: UNet passes.
    controlnets: tuple[ControlRef, ...] = ()
    #: SDXL added conditioning per row: pooled text embeddings ``[b, P]`` and time ids ``[b, 6]``.
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    @classmethod
    def of(cls, sample, timestep, hidden, adapters=(), controlnets=(), added=None) -> StepInput:
        """From a denoise ``UNetCall`` (``added``: ``{"text_embeds", "time_ids"}`` or empty)."""
        added = added or {}
        return cls(sample, timestep, hidden, adapters, controlnets, added.get("text_embeds"), added.get("time_ids"))

    def added_cond_kwargs(self, device=None, dtype=None) -> dict[str, torch.Tensor] | None:
        """The ``added_cond_kwargs`` of diffusers' UNet call (SDXL), or ``None``."""
        if self.text_embeds is None or self.time_ids is None:
            return None
        return {"text_embeds": self.text_embeds.to(device, dtype), "time_ids": self.time_ids.to(device, dtype)}

    def validate(self, info: ModelInfo) -> None:
        """Shape/dtype checks naming the tensor; run per request so one bad request fails alone."""
        b = self.sample.shape[0] if self.sample.ndim == 4 else -1
        if self.sample.ndim != 4 or self.sample.shape[1] != info.unet_in_channels:
            raise InvalidRequestError(
                "SAMPLE", f"expected [b, {info.unet_in_channels}, h, w], got {list(self.sample.shape)}"
            )
        if self.timestep.numel() != b:
            raise InvalidRequestError("TIMESTEP", f"expected {b} values (one per row), got {list(self.timestep.shape)}")
        ehs = self.encoder_hidden_states
        if ehs.ndim != 3 or ehs.shape[0] != b or ehs.shape[2] != info.cross_attention_dim:
            raise InvalidRequestError(
                "ENCODER_HIDDEN_STATES", f"expected [{b}, S, {info.cross_attention_dim}], got {list(ehs.shape)}"
            )
        info.check_added(b, self.text_embeds, self.time_ids)
        for name, t in (("SAMPLE", self.sample), ("TIMESTEP", self.timestep), ("ENCODER_HIDDEN_STATES", ehs)):
            if t.dtype != torch.float32:
                raise InvalidRequestError(name, f"expected FP32, got {t.dtype}")

    def batch_key(self) -> tuple:
        """Rows can be concatenated when latent size, sequence length and adapter set agree."""
        return (*self.sample.shape[1:], *self.encoder_hidden_states.shape[1:], adapter_key(self.adapters))


class UNetStep:
    """The denoiser of one model instance: ``UNet2DConditionModel`` on ``cfg.device`` in ``cfg.dtype``."""

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg
        self.info = ModelInfo.read(cfg.model_dir)
        from diffusers import UNet2DConditionModel  # (here, not at the top: every stage process imports this module)

        self.model = load_part(UNet2DConditionModel, cfg.model_dir, "unet", cfg.device, cfg.dtype)
        #: One patched LoRA set at a time per instance; restored from a pristine copy when the set changes.
        self.patcher = WeightPatcher(self.model, "unet")
        #: Parameter ``freeze``: the halves as frozen TorchScript graphs (:meth:`frozen_halves`).
        self.freeze = cfg.plan.freeze
        self.frozen: FrozenHalves | None = None

    def frozen_halves(self) -> FrozenHalves:
        """The frozen halves, traced now (~1 s on the cpu preset) if they are not yet. Call it on the thread that
        runs the passes. The first pass that can use them does, so a process that never runs a pass (the ``unet``
        model while ``denoise`` runs the UNet itself) never traces: each trace keeps tens of MB of torch's tracer
        state for the life of the process (:mod:`triton_backend.frozen`).
        """
        if self.frozen is None:
            with self.cfg.compute():  # (tracing runs the UNet three times)
                self.frozen = FrozenHalves(self.model, example_step(self.info, self.cfg.device, self.cfg.dtype))
        return self.frozen

    @torch.inference_mode()
    def _split_forward(self, merged: StepInput, rows: list[tuple[int, ResidualsWait | None]]) -> torch.Tensor:
        """Encoder half, then (waiting for ControlNet residuals where a step has them) the decoder half. Each half
        holds the CPU gate; the wait for residuals does not (the ControlNets compute meanwhile).
        """
        dev, dt = self.cfg.device, self.cfg.dtype
        trace_id = uuid.uuid4().hex if trace_enabled() else ""
        frozen = self.frozen_halves() if self.freeze else None
        if frozen is not None and frozen.fits(merged.sample):
            encoder, decoder = frozen.encoder, frozen.decoder
        else:
            encoder, decoder = functools.partial(encoder_half, self.model), functools.partial(decoder_half, self.model)
        with self.cfg.compute():
            trace("unet_step_start", id=trace_id, rows=merged.sample.shape[0])
            if self.patcher.ensure(merged.adapters) and trace_id:
                synchronize(dev)
                trace("unet_lora_switched", id=trace_id, adapters=len(merged.adapters))
            trace("unet_encoder_start", id=trace_id, controlnet=any(w for _, w in rows))
            state = encoder(
                merged.sample.to(dev, dt),
                merged.timestep.reshape(-1).to(dev),
                merged.encoder_hidden_states.to(dev, dt),
                merged.added_cond_kwargs(dev, dt),
            )
            if trace_id:
                synchronize(dev)
            trace("unet_encoder_end", id=trace_id)
            if not any(wait for _, wait in rows):
                noise = decoder(state).float().cpu()
                trace("unet_decoder_end", id=trace_id)
                return noise
        shapes = state.residual_shapes()
        total = sum(int(torch.Size(s[1:]).numel()) for s in shapes)
        received = [_sum_residuals(wait()) if wait is not None else None for _, wait in rows]
        # (where they arrived: "cuda:0" = on the GPU, by DLPack from the service; "cpu" = host memory)
        arrived = sorted({str(r.device) for r in received if r is not None})
        trace("unet_residuals_received", id=trace_id, arrived=arrived)
        flats = [
            r.to(dev) if r is not None else torch.zeros(b, total, device=dev)
            for (b, _), r in zip(rows, received, strict=True)
        ]
        with self.cfg.compute():
            down, mid = unpack_residuals(torch.cat(flats).to(dev, dt), shapes)
            noise = decoder(state, down, mid).float().cpu()
            trace("unet_decoder_end", id=trace_id)
            return noise

    def forward_many(self, steps: list[StepInput], control: ControlFn | None = None) -> list[torch.Tensor]:
        """Run several requests' rows together where their shapes allow; one output per input, in order.

        ``control(step)`` starts the ControlNet requests of a step and returns a function that waits for their
        packed residuals. All are started first, then each group runs its encoder half while they are in flight
        and waits only before its decoder half (ControlNet-as-a-Service).
        """
        waits = {i: control(step) for i, step in enumerate(steps) if step.controlnets and control is not None}
        outputs: list[torch.Tensor | None] = [None] * len(steps)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, step in enumerate(steps):
            groups.setdefault(step.batch_key(), []).append(i)
        # The group whose adapter set is already patched goes first: fewer restore/patch cycles.
        order = sorted(groups, key=lambda key: key[-1] != self.patcher.current)
        for key in order:
            indices = groups[key]
            merged = merge_rows([steps[i] for i in indices])
            noise = self._split_forward(merged, [(steps[i].sample.shape[0], waits.get(i)) for i in indices])
            for i, chunk in zip(indices, noise.split([steps[i].sample.shape[0] for i in indices]), strict=True):
                outputs[i] = chunk
        return outputs  # type: ignore[return-value]


#: A step request waiting for a local pass, and the future its generation awaits.
Queued = tuple[StepInput, "asyncio.Future[torch.Tensor]"]


class LocalSteps:
    """The UNet in the process that drives the step loop (``denoise`` in the cpu layout): no process hop per step.

    Step requests of every generation on the event loop are batched as the ``unet`` model's dynamic batcher does
    with ``max_queue_delay_microseconds: 0``: a request that finds the UNet idle starts a pass at the loop's next
    turn, with every request queued by then (up to ``max_rows`` rows; ``0`` = one request per pass, the ``unet``
    model without dynamic batching); requests that arrive during a pass go into the next one.

    A pass runs on the loop's own thread. The UNet holds every core for its duration anyway, and the generations
    on the loop have nothing to do but wait for it. A pass on a worker thread ran at half speed (in a ``denoise``
    stub on 2 cores: 50 ms a step instead of 28; in a plain process, any second thread that runs torch after the
    first did: 56 vs 27 ms): each thread that starts OpenMP regions gets its own team, and with more OpenMP threads
    than cores GNU OpenMP stops spinning at its barriers. So ``forward_many`` must not wait for the loop (ControlNets
    inline, not over BLS).
    """

    def __init__(self, forward_many: Callable[[list[StepInput]], list[torch.Tensor]], max_rows: int):
        #: One pass over several step requests, one output each (:meth:`UNetStep.forward_many` with its ControlNets).
        self.forward_many = forward_many
        self.max_rows = max_rows
        self._queue: list[Queued] = []
        #: The task that runs passes while requests are queued (a reference kept: the loop holds tasks weakly).
        self._drainer: asyncio.Task[None] | None = None

    async def run(self, steps: list[StepInput]) -> list[torch.Tensor]:
        """Noise predictions of ``steps`` (one request each), computed with whatever else is queued."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in steps]
        self._queue.extend(zip(steps, futures, strict=True))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        return [await f for f in futures]

    def _take(self) -> list[Queued]:
        """The next pass: queued requests in order while their rows fit ``max_rows`` (always at least one)."""
        self._queue = [(s, f) for s, f in self._queue if not f.done()]  # (a cancelled generation's step is dropped)
        batch: list[Queued] = []
        rows = 0
        for item in self._queue:
            rows += item[0].sample.shape[0]
            if batch and rows > self.max_rows:
                break
            batch.append(item)
        del self._queue[: len(batch)]
        return batch

    async def _drain(self) -> None:
        try:
            while True:
                await asyncio.sleep(0)  # every generation that became ready with the last pass queues its step
                batch = self._take()
                if not batch:
                    return
                try:
                    outputs = self.forward_many([s for s, _ in batch])
                except Exception as exc:  # noqa: BLE001 - the pass failed: every request in it gets the error
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), out in zip(batch, outputs, strict=True):
                    if not future.done():
                        future.set_result(out)
        finally:
            self._drainer = None


def merge_rows(steps: list[StepInput]) -> StepInput:
    """Steps that share a :meth:`StepInput.batch_key` as one (their rows concatenated); a single step as it is."""
    if len(steps) == 1:
        return steps[0]
    return StepInput(
        torch.cat([s.sample for s in steps]),
        torch.cat([s.timestep.reshape(-1) for s in steps]),
        torch.cat([s.encoder_hidden_states for s in steps]),
        steps[0].adapters,
        text_embeds=_cat_optional([s.text_embeds for s in steps]),
        time_ids=_cat_optional([s.time_ids for s in steps]),
    )


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on ``device`` (a traced time is then their end, not their launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cat_optional(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Rows of an optional per-row input (validated: all present or all absent for one model)."""
    return None if any(t is None for t in tensors) else torch.cat(tensors)  # type: ignore[arg-type]


def _sum_residuals(flats: list[torch.Tensor]) -> torch.Tensor:
    """MultiControlNet: residuals summed in order (each already scaled by its own conditioning scale)."""
    total = flats[0]
    for flat in flats[1:]:
        total = total + flat
    return total


def parse_step(tensors: dict[str, np.ndarray], info: ModelInfo) -> StepInput:
    """Triton tensors of one ``unet`` request → a validated :class:`StepInput`."""
    for name in INPUTS:
        if name not in tensors:
            raise InvalidRequestError(name, "is required")
    sample, timestep, hidden = (torch.from_numpy(np.array(tensors[name])) for name in INPUTS)
    step = StepInput(sample, timestep, hidden)
    if "ADAPTERS" in tensors:
        step.adapters = decode_adapters(tensors["ADAPTERS"])
    if "CONTROLNETS" in tensors:
        step.controlnets = decode_controlnets(tensors["CONTROLNETS"])
    for name in ADDED_INPUTS:
        if name in tensors:
            setattr(step, name.lower(), torch.from_numpy(np.array(tensors[name])))
    step.validate(info)
    return step


#: Input tensors of the ``unet`` model, in :class:`StepInput` field order.
INPUTS = ("SAMPLE", "TIMESTEP", "ENCODER_HIDDEN_STATES")
#: SDXL's added conditioning inputs (``unet`` and ``controlnet``); named like the ``StepInput`` attributes.
ADDED_INPUTS = ("TEXT_EMBEDS", "TIME_IDS")


def step_tensors(step: StepInput) -> dict[str, np.ndarray]:
    """The tensors a step sends on (to ``unet`` and to ``controlnet``): sample, timestep, conditioning."""
    out = {
        "SAMPLE": step.sample.numpy(),
        "TIMESTEP": step.timestep.reshape(-1, 1).numpy(),
        "ENCODER_HIDDEN_STATES": step.encoder_hidden_states.numpy(),
    }
    for name in ADDED_INPUTS:
        value = getattr(step, name.lower())
        if value is not None:
            out[name] = value.numpy()
    return out
