"""The Triton model classes of the pipeline stages; each ``model_repository/<stage>/1/model.py`` subclasses one.

``initialize`` parses ``args`` once into a :class:`~triton_backend.config.StageConfig` (a bad parameter fails the
load and names it); ``execute`` converts tensors and calls one function of the stage. ``triton_python_backend_utils``
exists only inside the Triton stub, so it is imported in ``initialize``. The techniques' own model classes live with
them: :class:`~triton_backend.controlnet.model.ControlNetModel`, :class:`~triton_backend.lora.model.LoraManagerModel`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ..config import StageConfig, instance_count
from ..controlnet import wire as controlnet_wire
from ..errors import ConfigError
from ..lora import wire as lora_wire
from ..lora.patch import AdapterRef
from ..stages import baseline, denoise, text_encoder, unet, vae
from .events import trace
from .io import Tensors, bls_infer_many, is_cancelled, read_tensors, respond_batched, respond_each


def load_adapters(pb_utils: Any, manager: str, loras: list[tuple[str, float]]) -> list[AdapterRef]:
    """BLS call to the LoRA manager: ``[(name, scale)]`` → ``AdapterRef``s pointing at converted factor files."""
    call = (manager, {"LORA_NAMES": lora_wire.names_tensor(loras)}, ["LORA_FILES"])
    return lora_wire.adapter_refs(loras, bls_infer_many(pb_utils, [call])[0])


class StageModel:
    """Common shape: typed config at load, one response per request in order, errors mapped in one place."""

    inputs: tuple[str, ...] = ()

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.logger = pb_utils.Logger
        self.cfg = StageConfig.from_triton_args(args)
        self.cfg.apply_threads()
        self.stage = self.build(self.cfg)

    def build(self, cfg: StageConfig) -> Any:
        raise NotImplementedError

    def handle(self, tensors: Tensors, request: Any) -> Tensors:
        return self.stage.handle(tensors)

    def execute(self, requests: list[Any]) -> list[Any]:
        return respond_each(
            requests, lambda r: self.handle(read_tensors(r, self.inputs, self.pb), r), self.pb, self.logger
        )

    def finalize(self) -> None:
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

    def report_counters(self, stats: Any, names: tuple[str, ...]) -> None:
        """Advance each counter by what ``stats.<name>`` grew since the last report."""
        for name in names:
            value = getattr(stats, name)
            self.metrics[name].increment(value - self._reported.get(name, 0))
            self._reported[name] = value

    def finalize(self) -> None:
        if self.stage is not None:
            self.stage.close()
        self.metrics = {}
        self.metric_families = {}
        super().finalize()


class TextEncoderModel(StageModel):
    """``text_encoder``: ``PROMPT``, ``NEGATIVE_PROMPT``, ``GUIDANCE_SCALE`` → ``PROMPT_EMBEDS [B, 77, D]``,
    ``POOLED_EMBEDS [B, P]`` FP32 (``P`` = 0 for SD1.x/2.x models).
    """

    inputs = text_encoder.INPUTS

    def build(self, cfg: StageConfig) -> text_encoder.TextEncoder:
        self.lora_manager = cfg.stage("lora_manager")
        return text_encoder.TextEncoder(cfg)

    def handle(self, tensors: Tensors, request: Any) -> Tensors:
        return self.stage.handle(tensors, lambda loras: load_adapters(self.pb, self.lora_manager, loras))


class VaeModel(StageModel):
    """``vae``: ``LATENTS [1, 4, h, w]`` FP32 → ``IMAGE [8h, 8w, 3]`` UINT8."""

    inputs = ("LATENTS",)

    def build(self, cfg: StageConfig) -> vae.VaeDecoder:
        return vae.VaeDecoder(cfg)


class DenoiseModel(StageModel):
    """``denoise``: request fields + ``PROMPT_EMBEDS`` → ``LATENTS``; calls ``unet`` over BLS once per step.

    Parameter ``latent_parallel`` (``on``/``off``/``auto``): with guidance, send the two branches of each step as
    two concurrent requests (two ``unet`` instances) instead of one batch-2 request; ``auto`` = on when the
    ``unet`` model has at least two instances. The optional input ``LATENT_PARALLEL`` (BOOL) overrides it per
    request (benchmarks, tests).
    """

    inputs = ("PROMPT_EMBEDS", "POOLED_EMBEDS", *denoise.INPUTS, "LATENT_PARALLEL")

    def build(self, cfg: StageConfig) -> denoise.Denoiser:
        self.unet_model = cfg.stage("unet")
        unet_instances = 1
        if cfg.repository is not None and (cfg.repository / self.unet_model / "config.pbtxt").is_file():
            unet_instances = instance_count(cfg.repository / self.unet_model / "config.pbtxt")
        try:
            self.latent_parallel = denoise.resolve_latent_parallel(
                cfg.params.get("latent_parallel", "auto"), unet_instances
            )
        except ValueError as exc:
            raise ConfigError(f"{cfg.model_name}: {exc}") from None
        self.logger.log_info(f"denoise: latent_parallel={self.latent_parallel} (unet instances: {unet_instances})")
        self.lora_manager = cfg.stage("lora_manager")
        self.controlnet_model = cfg.stage("controlnet")
        self.loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lora-load")
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

    def prepare_hints(self, hints: list[tuple[str, np.ndarray]]) -> list[str]:
        """One ``controlnet`` *prepare* request per hint image, all at once; their hint-embedding files."""
        calls = [
            (self.controlnet_model, controlnet_wire.prepare_tensors(name, image), ["HINT_FILE"])
            for name, image in hints
        ]
        return [controlnet_wire.hint_file(out) for out in bls_infer_many(self.pb, calls)]

    def unet_many(self, calls: list[denoise.UNetCall]) -> list[torch.Tensor]:
        outs = bls_infer_many(self.pb, [(self.unet_model, self.step_inputs(c), ["NOISE_PRED"]) for c in calls])
        return [torch.from_numpy(o["NOISE_PRED"]) for o in outs]

    def handle(self, tensors: Tensors, request: Any) -> Tensors:
        parallel = self.latent_parallel
        if "LATENT_PARALLEL" in tensors:
            parallel = bool(np.asarray(tensors.pop("LATENT_PARALLEL")).reshape(-1)[0])
        unet_fn = denoise.latent_parallel(self.unet_many) if parallel else (lambda *call: self.unet_many([call])[0])
        return self.stage.handle(
            tensors,
            unet_fn,
            load_loras=lambda loras: self.loader.submit(load_adapters, self.pb, self.lora_manager, loras),
            is_cancelled=lambda: is_cancelled(request),
            prepare_hints=self.prepare_hints,
        )


class UNetModel(StageModel):
    """``unet`` (dynamic batching): ``SAMPLE [b, 4, h, w]``, ``TIMESTEP [b, 1]``, ``ENCODER_HIDDEN_STATES [b, S, D]``
    (SDXL: also ``TEXT_EMBEDS [b, P]``, ``TIME_IDS [b, 6]``) → ``NOISE_PRED [b, 4, h, w]``; rows of several requests
    run in one forward pass.
    """

    inputs = (*unet.INPUTS, *unet.ADDED_INPUTS, "ADAPTERS", "CONTROLNETS")

    def build(self, cfg: StageConfig) -> unet.UNetStep:
        self.controlnet_model = cfg.stage("controlnet")
        # Exec() of a BLS request blocks; like async_exec, run it on threads so the encoder half overlaps it.
        self.control_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="controlnet")
        return unet.UNetStep(cfg)

    def control(self, step: unet.StepInput) -> unet.ResidualsWait:
        """Start one ``controlnet`` *step* request per ControlNet of ``step`` (its rows); return a waiter."""
        tensors = unet.step_tensors(step)
        calls = [
            (self.controlnet_model, controlnet_wire.step_request_tensors(tensors, ref), ["RESIDUALS"])
            for ref in step.controlnets
        ]
        trace("unet_controlnet_sent", n=len(calls))
        futures = [self.control_pool.submit(bls_infer_many, self.pb, [call]) for call in calls]
        return lambda: [torch.from_numpy(f.result()[0]["RESIDUALS"]) for f in futures]

    def execute(self, requests: list[Any]) -> list[Any]:
        def compute_many(steps: list[unet.StepInput]) -> list[Tensors]:
            return [{"NOISE_PRED": out.numpy()} for out in self.stage.forward_many(steps, self.control)]

        return respond_batched(
            requests,
            lambda r: unet.parse_step(read_tensors(r, self.inputs, self.pb), self.stage.info),
            compute_many,
            self.pb,
        )


class BaselineModel(StageModel):
    """Baseline ``txt2img`` (``baseline_repository/``): the stock diffusers pipeline, same contract as ours."""

    inputs = baseline.INPUTS

    def build(self, cfg: StageConfig) -> baseline.BaselinePipeline:
        return baseline.BaselinePipeline(cfg)
