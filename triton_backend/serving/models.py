"""The Triton model classes of the pipeline stages; each ``model_repository/<stage>/1/model.py`` subclasses one.

``initialize`` parses ``args`` once into a :class:`~triton_backend.config.StageConfig` (a bad parameter fails the
load and names it), then :class:`~triton_backend.serving.shell.ModelShell` sets up what every model has (``pb_utils``,
the stages it calls, its BLS client); ``execute`` converts tensors and calls one function of the stage. The
techniques' own model classes live with them: :class:`~triton_backend.controlnet.model.ControlNetModel`,
:class:`~triton_backend.lora.model.LoraManagerModel`; the public models ``txt2img`` and ``txt2img_stream``, which
run no model, are in :mod:`triton_backend.serving.public`.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import numpy as np
import torch

from ..config import StageConfig
from ..controlnet import wire as controlnet_wire
from ..controlnet.service import ControlNetService, ControlRow
from ..lora import wire as lora_wire
from ..lora.patch import AdapterRef
from ..plan import IN_PROCESS
from ..schema import VAE_ENCODE_INPUTS
from ..stages import baseline, denoise, preview, text_encoder, unet, vae
from .events import trace
from .io import (
    BlsCall,
    Tensors,
    cancellation_check,
    failure_response,
    make_response,
    read_tensors,
    respond_batched,
    respond_each,
    send_final,
)
from .progress import ProgressSender, preview_every, progress_address
from .shell import ModelShell


def lora_call(manager: str, loras: list[tuple[str, float]]) -> BlsCall:
    """The BLS call to the LoRA manager for ``[(name, scale)]``; :func:`lora_wire.adapter_refs` reads its answer."""
    return (manager, {"LORA_NAMES": lora_wire.names_tensor(loras)}, ["LORA_FILES"])


def freeze_loaded_objects() -> None:
    """Exclude every object alive now (the imported modules, the loaded model) from Python's garbage collector.

    A stage process holds ~430k objects after importing torch, diffusers and transformers (sympy alone, imported by
    ``torch._dynamo``, brings 400 modules). A full collection walks all of them: ~190 ms on an idle core, 0.4-0.8 s
    on a busy one, and Python starts one whenever enough objects survived since the last. In a serving process
    that is a stall of the step in flight (measured under load: UNet steps of 0.78 s instead of 0.06 s). After
    :func:`gc.freeze` a collection walks only what was allocated since.
    """
    gc.collect()
    gc.freeze()


class StageModel(ModelShell):
    """Common shape: typed config at load, one response per request in order, errors mapped in one place."""

    inputs: tuple[str, ...] = ()
    #: Freeze the loaded objects out of the garbage collector (:func:`freeze_loaded_objects`) after ``build``.
    freeze_after_load = True

    def initialize(self, args: dict[str, Any]) -> None:
        # (first: a bad parameter fails the load before anything else)
        self.cfg = StageConfig.from_triton_args(args, self.role)
        self.cfg.apply_torch_settings()
        super().initialize(args)
        self.logger.log_info(self.cfg.plan.line())
        self.stage = self.build(self.cfg)
        if self.freeze_after_load:
            freeze_loaded_objects()

    def build(self, cfg: StageConfig) -> Any:
        raise NotImplementedError

    def handle(self, tensors: Tensors, request: Any) -> Tensors:
        return self.stage.handle(tensors)

    def execute(self, requests: list[Any]) -> list[Any] | None:
        return respond_each(
            requests, lambda r: self.handle(read_tensors(r, self.inputs, self.pb), r), self.pb, self.logger
        )

    def finalize(self) -> None:
        super().finalize()  # (the BLS client stops first: no generation runs on after this)
        self.stage = None


class MetricsModel(StageModel):
    """Custom Triton metrics (Python backend ``MetricFamily``) for a stage that keeps cumulative stats."""

    def init_metrics(self, specs: dict[str, tuple[str, str, str]], model_name: str) -> None:
        """``specs``: key → (metric name, description, ``"counter"`` or ``"gauge"``)."""
        kinds = {"counter": self.pb.MetricFamily.COUNTER, "gauge": self.pb.MetricFamily.GAUGE}
        # Families must outlive their metrics (Triton requirement): both are kept on the instance.
        self.metric_families = {k: self.pb.MetricFamily(n, d, kinds[kind]) for k, (n, d, kind) in specs.items()}
        self.metrics = {k: f.Metric({"model": model_name}) for k, f in self.metric_families.items()}
        self._reported: dict[str, float] = {}

    def report_counters(self, stats: Any, names: tuple[str, ...], prefix: str = "") -> None:
        """Advance each counter ``prefix + name`` by what ``stats.<name>`` grew since the last report."""
        for name in names:
            key, value = prefix + name, getattr(stats, name)
            self.metrics[key].increment(value - self._reported.get(key, 0))
            self._reported[key] = value

    @staticmethod
    def cache_metric_specs(key: str, metric: str, what: str) -> dict[str, tuple[str, str, str]]:
        """The metrics of a :class:`~triton_backend.cache.ByteLRU` (keys ``<key>_hits`` ...), for :meth:`init_metrics`:
        ``swiftdiffusion_<metric>_{hits,misses,evictions}_total`` and ``..._bytes`` / ``..._budget_bytes``.
        """
        return {
            f"{key}_hits": (f"swiftdiffusion_{metric}_hits_total", f"{what} found in the cache", "counter"),
            f"{key}_misses": (f"swiftdiffusion_{metric}_misses_total", f"{what} computed (not cached)", "counter"),
            f"{key}_evictions": (f"swiftdiffusion_{metric}_evictions_total", f"{what} evicted (LRU)", "counter"),
            f"{key}_bytes": (f"swiftdiffusion_{metric}_bytes", f"Bytes of {what.lower()} cached now", "gauge"),
            f"{key}_budget": (f"swiftdiffusion_{metric}_budget_bytes", "Byte budget of the cache (0 = off)", "gauge"),
        }

    def report_cache(self, key: str, cache: Any) -> None:
        """Export a :class:`~triton_backend.cache.ByteLRU`'s counters (see :meth:`cache_metric_specs`)."""
        self.report_counters(cache.stats, ("hits", "misses", "evictions"), prefix=f"{key}_")
        self.metrics[f"{key}_bytes"].set(float(cache.stats.bytes_resident))
        self.metrics[f"{key}_budget"].set(float(cache.budget_bytes))

    def finalize(self) -> None:
        if self.stage is not None:
            self.stage.close()
        self.metrics = {}
        self.metric_families = {}
        super().finalize()


class TextEncoderModel(MetricsModel):
    """``text_encoder``: ``PROMPT``, ``NEGATIVE_PROMPT``, ``GUIDANCE_SCALE`` → ``PROMPT_EMBEDS [B, 77, D]``,
    ``POOLED_EMBEDS [B, P]`` FP32 (``P`` = 0 for SD1.x/2.x models). Repeated prompts come from its prompt-embedding
    cache (parameter ``prompt_cache_mb``; metrics ``swiftdiffusion_prompt_cache_*``).
    """

    role = "text_encoder"

    inputs = text_encoder.INPUTS

    def build(self, cfg: StageConfig) -> text_encoder.TextEncoder:
        self.lora_manager = cfg.stage("lora_manager")
        self.init_metrics(self.cache_metric_specs("prompt", "prompt_cache", "Prompt embeddings"), cfg.model_name)
        return text_encoder.TextEncoder(cfg)

    def handle(self, tensors: Tensors, request: Any) -> Tensors:
        def load_adapters(loras: list[tuple[str, float]]) -> list[AdapterRef]:
            return lora_wire.adapter_refs(loras, self.bls.infer_many([lora_call(self.lora_manager, loras)])[0])

        try:
            return self.stage.handle(tensors, load_adapters)
        finally:
            self.report_cache("prompt", self.stage.cache)


class VaeModel(StageModel):
    """``vae``: ``LATENTS [n, 4, h, w]`` FP32 → ``IMAGES [n, 8h, 8w, 3]`` UINT8; ``INIT_IMAGE`` (``MASK_IMAGE``)
    → ``INIT_MOMENTS`` (``MASKED_MOMENTS``, ``LATENT_MASK``) for ``img2img``.
    """

    role = "vae"

    inputs = ("LATENTS", *VAE_ENCODE_INPUTS)

    def build(self, cfg: StageConfig) -> vae.Vae:
        return vae.Vae(cfg)


class UNetHost:
    """A UNet and the way its steps reach their ControlNets, as the plan says (``cfg.plan.controlnets``): in this
    process (``denoise`` in the cpu layout: after the encoder half, with this process's threads), or one request per
    ControlNet to the ``controlnet`` service (``unet`` in the split layout: sent before the encoder half runs).
    """

    def __init__(self, cfg: StageConfig, bls: Any):
        self.bls = bls
        self.controlnet_model = cfg.stage("controlnet")
        in_process = cfg.plan.controlnets == IN_PROCESS
        #: The ControlNets of this process (cpu layout), which also embeds the hints; ``None``: the service.
        self.controlnets = ControlNetService.from_config(cfg) if in_process else None
        self.unet = unet.UNetStep(cfg)

    def control(self, step: unet.StepInput) -> unet.ResidualsWait:
        """Start one ``controlnet`` *step* request per ControlNet of ``step`` (its rows); return a waiter.

        In process: no request; the waiter runs the ControlNets here, after the encoder half.
        """
        if self.controlnets is not None:
            service = self.controlnets
            rows = [ControlRow.from_step(step, ref.name, ref.hint_file, ref.scale) for ref in step.controlnets]
            return lambda: service.step_many(rows)
        tensors = unet.step_tensors(step)
        calls = [
            (self.controlnet_model, controlnet_wire.step_request_tensors(tensors, ref), ["RESIDUALS"])
            for ref in step.controlnets
        ]
        trace("unet_controlnet_sent", n=len(calls))
        # Started on the BLS loop, so the encoder half runs while they are in flight.
        futures = [self.bls.submit(self.bls.infer([call])) for call in calls]
        return lambda: [torch.as_tensor(f.result()[0]["RESIDUALS"]) for f in futures]

    def forward_many(self, steps: list[unet.StepInput]) -> list[torch.Tensor]:
        return self.unet.forward_many(steps, self.control)

    def close(self) -> None:
        if self.controlnets is not None:
            self.controlnets.close()


class DenoiseModel(StageModel):
    """``denoise``: request fields + ``PROMPT_EMBEDS`` → ``LATENTS``; one UNet pass per step, in this process (the
    cpu layout: :class:`UNetHost` with its ControlNets, batched by :class:`~triton_backend.stages.unet.LocalSteps`)
    or as a BLS call to ``unet`` (the split layout).

    One instance drives every generation: ``execute`` hands each request to a coroutine on the instance's BLS loop and
    returns; the coroutine waits for the step scheduler (:mod:`triton_backend.slo`) before each step and answers
    through the request's response sender when its latents are done (or with its error).

    Latent parallelism (the plan's ``latent_parallel``, split layout): with guidance, send the two branches of each
    step as two concurrent requests (two ``unet`` instances) instead of one batch-2 request. The optional input
    ``LATENT_PARALLEL`` (BOOL) overrides it per request (benchmarks, tests). ``PROGRESS_ADDRESS``,
    ``PROGRESS_STEPS`` and ``PREVIEW_EVERY`` come from the public models: the socket they watch (:meth:`answer`).
    """

    role = "denoise"

    inputs: tuple[str, ...] = (
        "PROMPT_EMBEDS",
        "POOLED_EMBEDS",
        *denoise.INPUTS,
        *denoise.IMAGE_TENSORS,
        "LATENT_PARALLEL",
        "PROGRESS_ADDRESS",
        "PROGRESS_STEPS",
        "PREVIEW_EVERY",
    )

    def build(self, cfg: StageConfig) -> denoise.Denoiser:
        self.unet_model = cfg.stage("unet")
        self.lora_manager = cfg.stage("lora_manager")
        self.controlnet_model = cfg.stage("controlnet")
        #: The plan's ``latent_parallel`` (the split layout's, with a unet of two instances or more).
        self.latent_parallel = cfg.plan.latent_parallel
        #: The cpu layout's UNet (and its ControlNets), run in this process; ``None``: the ``unet`` model's.
        self.unet_host: UNetHost | None = None
        self.local_unet: unet.LocalSteps | None = None
        if cfg.plan.unet_in_process:
            self.unet_host = UNetHost(cfg, self.bls)
            if self.unet_host.unet.freeze:
                # Traced now, not in the first request, and on the loop's thread, where the passes run
                # (LocalSteps): the trace runs the model, which starts that thread's OpenMP team; a second team on
                # this thread would halve the speed of every pass.
                self.bls.call(self.unet_host.unet.frozen_halves)
            self.local_unet = unet.LocalSteps(self.unet_host.forward_many, cfg.params["max_rows"])
        return denoise.Denoiser(cfg)

    def step_inputs(self, call: denoise.UNetCall) -> Tensors:
        """The ``unet`` request of one UNet call: the step's tensors, its LoRA set and its ControlNets."""
        step = unet.StepInput.of(*call)
        inputs = unet.step_tensors(step)
        rows = step.sample.shape[0]
        if step.adapters:
            inputs["ADAPTERS"] = lora_wire.encode_adapters(step.adapters, rows)
        if step.controlnets:
            inputs["CONTROLNETS"] = controlnet_wire.encode_controlnets(step.controlnets, rows)
        return inputs

    async def prepare_hints(self, hints: list[tuple[str, np.ndarray]]) -> list[str]:
        """The hint-embedding file of each hint image: embedded in this process (cpu layout), or one ``controlnet``
        *prepare* request per hint image, all at once.
        """
        if self.unet_host is not None and self.unet_host.controlnets is not None:
            return [self.unet_host.controlnets.prepare(name, image) for name, image in hints]
        calls = [
            (self.controlnet_model, controlnet_wire.prepare_tensors(name, image), ["HINT_FILE"])
            for name, image in hints
        ]
        return [controlnet_wire.hint_file(out) for out in await self.bls.infer(calls)]

    async def unet_many(self, calls: list[denoise.UNetCall]) -> list[torch.Tensor]:
        if self.local_unet is not None:
            return await self.local_unet.run([unet.StepInput.of(*call) for call in calls])
        outs = await self.bls.infer([(self.unet_model, self.step_inputs(c), ["NOISE_PRED"]) for c in calls])
        return [torch.from_numpy(o["NOISE_PRED"]) for o in outs]

    async def load_adapters(self, loras: list[tuple[str, float]]) -> list[AdapterRef]:
        return lora_wire.adapter_refs(loras, (await self.bls.infer([lora_call(self.lora_manager, loras)]))[0])

    async def generate(
        self,
        tensors: Tensors,
        request: Any,
        arrival: float,
        progress: ProgressSender | None = None,
        every: int = 0,
        steps: bool = True,
    ) -> Tensors:
        """The request's ``LATENTS`` and ``LORA_LANDED_STEP`` from its fields and ``PROMPT_EMBEDS``; with ``steps``,
        each step is reported to ``progress`` (with a preview every ``every`` steps) when there is one.
        """
        parallel = self.latent_parallel
        if "LATENT_PARALLEL" in tensors:
            parallel = bool(np.asarray(tensors.pop("LATENT_PARALLEL")).reshape(-1)[0])

        cancelled = cancellation_check(request)

        async def one_call(*call: Any) -> torch.Tensor:
            return (await self.unet_many([call]))[0]

        def on_step(state: denoise.DenoiseState) -> None:
            assert progress is not None
            shown = every and state.step_index % every == 0 and not state.done
            image = preview.latent_rgb(state.latents, self.stage.info) if shown else None
            progress.send(state.step_index, len(state.timesteps), image)

        return await self.stage.generate(
            tensors,
            denoise.latent_parallel(self.unet_many) if parallel else one_call,
            arrival,
            load_loras=lambda loras: asyncio.ensure_future(self.load_adapters(loras)),
            is_cancelled=lambda: cancelled() or (progress is not None and progress.closed),
            prepare_hints=self.prepare_hints,
            on_step=on_step if progress is not None and steps else None,
        )

    async def answer(self, request: Any, sender: Any, arrival: float) -> None:
        """Generate, then send the request's one response (its error if anything failed).

        With ``PROGRESS_ADDRESS`` (from the public models): this generation's socket, closed with its closing frame
        before the response; the public model hanging up cancels the generation. With ``PROGRESS_STEPS`` (default
        true; ``txt2img_stream``), every step goes to it as it is done, with a preview every ``PREVIEW_EVERY`` steps
        (:mod:`triton_backend.serving.progress`); ``txt2img`` sends false: it only watches for a ``denoise`` that died.
        """
        progress = None
        try:
            tensors = read_tensors(request, self.inputs, self.pb)
            every = preview_every(tensors.pop("PREVIEW_EVERY", None))
            steps = bool(np.asarray(tensors.pop("PROGRESS_STEPS", True)).reshape(-1)[0])
            if "PROGRESS_ADDRESS" in tensors:
                progress = await ProgressSender.connect(progress_address(tensors.pop("PROGRESS_ADDRESS")))
            result = await self.generate(tensors, request, arrival, progress, every, steps)
            response = make_response(result, self.pb, request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error response
            response = failure_response(exc, self.pb, self.logger)
        if progress is not None:
            await progress.close()  # (its last frames reach the stream before this response does)
        send_final(sender, response, self.pb)

    def execute(self, requests: list[Any]) -> None:
        arrival = time.monotonic()
        for request in requests:
            self.bls.submit(self.answer(request, request.get_response_sender(), arrival))

    def finalize(self) -> None:
        super().finalize()  # (the BLS client stops first: no step runs on after this)
        if self.unet_host is not None:
            self.unet_host.close()


class UNetModel(StageModel):
    """``unet`` (dynamic batching): ``SAMPLE [b, 4, h, w]``, ``TIMESTEP [b, 1]``, ``ENCODER_HIDDEN_STATES [b, S, D]``
    (SDXL: also ``TEXT_EMBEDS [b, P]``, ``TIME_IDS [b, 6]``) → ``NOISE_PRED [b, 4, h, w]``; rows of several requests
    run in one forward pass.
    """

    role = "unet"

    inputs = (*unet.INPUTS, *unet.ADDED_INPUTS, "ADAPTERS", "CONTROLNETS")

    def build(self, cfg: StageConfig) -> unet.UNetStep:
        self.host = UNetHost(cfg, self.bls)
        return self.host.unet

    def execute(self, requests: list[Any]) -> list[Any]:
        def compute_many(steps: list[unet.StepInput]) -> list[Tensors]:
            return [{"NOISE_PRED": out.numpy()} for out in self.host.forward_many(steps)]

        return respond_batched(
            requests,
            lambda r: unet.parse_step(read_tensors(r, self.inputs, self.pb), self.stage.info),
            compute_many,
            self.pb,
        )

    def finalize(self) -> None:
        self.host.close()
        super().finalize()


class BaselineModel(StageModel):
    """Baseline ``txt2img`` (``baseline_repository/``): the stock diffusers pipeline, same contract as ours."""

    role = "baseline"

    inputs = baseline.INPUTS
    #: Stock: the way diffusers is served in a Triton Python model without our tuning.
    freeze_after_load = False

    def build(self, cfg: StageConfig) -> baseline.BaselinePipeline:
        return baseline.BaselinePipeline(cfg)
