"""The Triton model classes; each ``model_repository/<stage>/1/model.py`` subclasses one of these.

``initialize`` parses ``args`` once into a :class:`~triton_backend.config.StageConfig` (a bad parameter fails the
load and names it); ``execute`` converts tensors and calls one function of the stage. ``triton_python_backend_utils``
exists only inside the Triton stub, so it is imported in ``initialize``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import StageConfig
from .triton_io import bls_infer_many, is_cancelled, read_tensors, respond_batched, respond_each


def load_adapters(pb_utils: Any, manager: str, loras: list[tuple[str, float]]) -> list[Any]:
    """BLS call to the LoRA manager: ``[(name, scale)]`` → ``AdapterRef``s pointing at converted factor files."""
    from .lora.patch import AdapterRef

    names = np.array([n.encode() for n, _ in loras], dtype=np.object_)
    out = bls_infer_many(pb_utils, [(manager, {"LORA_NAMES": names}, ["LORA_FILES"])])[0]
    files = [bytes(f).decode() for f in out["LORA_FILES"].reshape(-1)]
    return [AdapterRef(n, f, s) for (n, s), f in zip(loras, files, strict=True)]


class _StageModel:
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

    def handle(self, tensors: dict[str, Any], request: Any) -> dict[str, Any]:
        return self.stage.handle(tensors)

    def execute(self, requests: list[Any]) -> list[Any]:
        return respond_each(
            requests, lambda r: self.handle(read_tensors(r, self.inputs, self.pb), r), self.pb, self.logger
        )

    def finalize(self) -> None:
        self.stage = None


class _WithMetrics(_StageModel):
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


class TextEncoderModel(_StageModel):
    """``text_encoder``: ``PROMPT``, ``NEGATIVE_PROMPT``, ``GUIDANCE_SCALE`` → ``PROMPT_EMBEDS [B, 77, D]``,
    ``POOLED_EMBEDS [B, P]`` FP32 (``P`` = 0 for SD1.x/2.x models).
    """

    from .text_encoding import INPUTS as inputs

    def build(self, cfg: StageConfig) -> Any:
        from .text_encoding import TextEncoder

        self.lora_manager = cfg.stage("lora_manager")
        return TextEncoder(cfg)

    def handle(self, tensors: dict[str, Any], request: Any) -> dict[str, Any]:
        return self.stage.handle(tensors, lambda loras: load_adapters(self.pb, self.lora_manager, loras))


class VaeModel(_StageModel):
    """``vae``: ``LATENTS [1, 4, h, w]`` FP32 → ``IMAGE [8h, 8w, 3]`` UINT8."""

    inputs = ("LATENTS",)

    def build(self, cfg: StageConfig) -> Any:
        from .vae_decode import VaeDecoder

        return VaeDecoder(cfg)


class DenoiseModel(_StageModel):
    """``denoise``: request fields + ``PROMPT_EMBEDS`` → ``LATENTS``; calls ``unet`` over BLS once per step.

    Parameter ``latent_parallel`` (``on``/``off``/``auto``): with guidance, send the two branches of each step as
    two concurrent requests (two ``unet`` instances) instead of one batch-2 request; ``auto`` = on when the
    ``unet`` model has at least two instances. The optional input ``LATENT_PARALLEL`` (BOOL) overrides it per
    request (benchmarks, tests).
    """

    from .denoise import INPUTS as _fields

    inputs = ("PROMPT_EMBEDS", "POOLED_EMBEDS", *_fields, "LATENT_PARALLEL")

    def build(self, cfg: StageConfig) -> Any:
        from .config import instance_count
        from .denoise import Denoiser, resolve_latent_parallel
        from .errors import ConfigError

        self.unet_model = cfg.stage("unet")
        unet_instances = 1
        if cfg.repository is not None and (cfg.repository / self.unet_model / "config.pbtxt").is_file():
            unet_instances = instance_count(cfg.repository / self.unet_model / "config.pbtxt")
        try:
            self.latent_parallel = resolve_latent_parallel(cfg.params.get("latent_parallel", "auto"), unet_instances)
        except ValueError as exc:
            raise ConfigError(f"{cfg.model_name}: {exc}") from None
        self.logger.log_info(f"denoise: latent_parallel={self.latent_parallel} (unet instances: {unet_instances})")
        from concurrent.futures import ThreadPoolExecutor

        self.lora_manager = cfg.stage("lora_manager")
        self.controlnet_model = cfg.stage("controlnet")
        self.loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lora-load")
        return Denoiser(cfg)

    def handle(self, tensors: dict[str, Any], request: Any) -> dict[str, Any]:
        import torch

        from .denoise import latent_parallel
        from .unet_step import StepInput, encode_adapters, encode_triples, step_tensors

        def step_inputs(*call: Any) -> dict[str, Any]:
            step = StepInput.of(*call)
            inputs = step_tensors(step)
            rows = step.sample.shape[0]
            if step.adapters:
                inputs["ADAPTERS"] = encode_adapters(step.adapters, rows)
            if step.controlnets:
                inputs["CONTROLNETS"] = encode_triples(step.controlnets, rows)
            return inputs

        def prepare_hints(hints: list[tuple[str, Any]]) -> list[str]:
            calls = [
                (
                    self.controlnet_model,
                    {"CONTROLNET_NAME": np.array([[name.encode()]], dtype=np.object_), "HINT_IMAGE": image[None]},
                    ["HINT_FILE"],
                )
                for name, image in hints
            ]
            return [bytes(out["HINT_FILE"].reshape(-1)[0]).decode() for out in bls_infer_many(self.pb, calls)]

        def unet_many(calls: list[tuple[Any, ...]]) -> list[Any]:
            outs = bls_infer_many(self.pb, [(self.unet_model, step_inputs(*c), ["NOISE_PRED"]) for c in calls])
            return [torch.from_numpy(o["NOISE_PRED"]) for o in outs]

        parallel = self.latent_parallel
        if "LATENT_PARALLEL" in tensors:
            parallel = bool(np.asarray(tensors.pop("LATENT_PARALLEL")).reshape(-1)[0])
        unet = latent_parallel(unet_many) if parallel else (lambda *call: unet_many([call])[0])
        return self.stage.handle(
            tensors,
            unet,
            load_loras=lambda loras: self.loader.submit(load_adapters, self.pb, self.lora_manager, loras),
            is_cancelled=lambda: is_cancelled(request),
            prepare_hints=prepare_hints,
        )


class UNetModel(_StageModel):
    """``unet`` (dynamic batching): ``SAMPLE [b, 4, h, w]``, ``TIMESTEP [b, 1]``, ``ENCODER_HIDDEN_STATES [b, S, D]``
    (SDXL: also ``TEXT_EMBEDS [b, P]``, ``TIME_IDS [b, 6]``) → ``NOISE_PRED [b, 4, h, w]``; rows of several requests
    run in one forward pass.
    """

    from .unet_step import ADDED_INPUTS as _added
    from .unet_step import INPUTS as _tensors

    inputs = (*_tensors, *_added, "ADAPTERS", "CONTROLNETS")

    def build(self, cfg: StageConfig) -> Any:
        from concurrent.futures import ThreadPoolExecutor

        from .unet_step import UNetStep

        self.controlnet_model = cfg.stage("controlnet")
        # Exec() of a BLS request blocks; like async_exec, run it on threads so the encoder half overlaps it.
        self.control_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="controlnet")
        return UNetStep(cfg)

    def control(self, step: Any) -> Any:
        """Start one ``controlnet`` request per ControlNet of ``step`` (its rows); return a waiter."""
        import torch

        from .trace import trace
        from .unet_step import step_tensors

        rows = step.sample.shape[0]
        tensors = step_tensors(step)
        calls = [
            (
                self.controlnet_model,
                {
                    **tensors,
                    "CONTROLNET_NAME": np.array([[name.encode()]] * rows, dtype=np.object_),
                    "HINT_FILE": np.array([[hint.encode()]] * rows, dtype=np.object_),
                    "SCALE": np.full((rows, 1), scale, dtype=np.float32),
                },
                ["RESIDUALS"],
            )
            for name, hint, scale in step.controlnets
        ]
        trace("unet_controlnet_sent", n=len(calls))
        futures = [self.control_pool.submit(bls_infer_many, self.pb, [call]) for call in calls]
        return lambda: [torch.from_numpy(f.result()[0]["RESIDUALS"]) for f in futures]

    def execute(self, requests: list[Any]) -> list[Any]:
        from .unet_step import parse_step

        def compute_many(steps: list[Any]) -> list[dict[str, Any]]:
            return [{"NOISE_PRED": out.numpy()} for out in self.stage.forward_many(steps, self.control)]

        return respond_batched(
            requests,
            lambda r: parse_step(read_tensors(r, self.inputs, self.pb), self.stage.info),
            compute_many,
            self.pb,
        )


class LoraManagerModel(_WithMetrics):
    """``lora_manager``: ``LORA_NAMES [m]`` → ``LORA_FILES [m]`` (converted factor files) and
    ``LORA_TEXT_ENCODER [m]`` (BOOL); cache hits/misses/load seconds/bytes resident are Triton metrics.
    """

    inputs = ("LORA_NAMES",)

    def build(self, cfg: StageConfig) -> Any:
        from .lora.manager import LoraManager

        manager = LoraManager(cfg)
        self.init_metrics(
            {
                "hits": ("swiftdiffusion_lora_cache_hits_total", "LoRA cache hits", "counter"),
                "misses": ("swiftdiffusion_lora_cache_misses_total", "LoRA cache misses (loads)", "counter"),
                "load_seconds": (
                    "swiftdiffusion_lora_load_seconds_total",
                    "Seconds loading+converting LoRAs",
                    "counter",
                ),
                "bytes_resident": (
                    "swiftdiffusion_lora_cache_bytes",
                    "Bytes of converted LoRAs in host memory",
                    "gauge",
                ),
                "budget": ("swiftdiffusion_lora_cache_budget_bytes", "Byte budget of the LoRA cache", "gauge"),
            },
            cfg.model_name,
        )
        self.metrics["budget"].set(float(manager.store.budget_bytes))
        return manager

    def handle(self, tensors: dict[str, Any], request: Any) -> dict[str, Any]:
        try:
            return self.stage.handle(tensors)
        finally:
            self.report_counters(self.stage.store.stats, ("hits", "misses", "load_seconds"))
            self.metrics["bytes_resident"].set(float(self.stage.store.stats.bytes_resident))


class ControlNetModel(_WithMetrics):
    """``controlnet``: shared ControlNet service. *prepare*: ``CONTROLNET_NAME [b, 1]``, ``HINT_IMAGE [b, H, W, 3]``
    → ``HINT_FILE [b, 1]``; *step*: ``CONTROLNET_NAME``, ``HINT_FILE``, ``SCALE [b, 1]``, ``SAMPLE``, ``TIMESTEP``,
    ``ENCODER_HIDDEN_STATES`` → ``RESIDUALS [b, N]`` (every skip residual and the mid residual, packed).
    """

    inputs = (
        "CONTROLNET_NAME",
        "HINT_IMAGE",
        "HINT_FILE",
        "SCALE",
        "SAMPLE",
        "TIMESTEP",
        "ENCODER_HIDDEN_STATES",
        "TEXT_EMBEDS",
        "TIME_IDS",
    )

    def build(self, cfg: StageConfig) -> Any:
        from .controlnet.service import ControlNetService

        service = ControlNetService.from_config(cfg)
        self.init_metrics(
            {
                "hits": ("swiftdiffusion_controlnet_hits_total", "Requests served by a resident ControlNet", "counter"),
                "misses": (
                    "swiftdiffusion_controlnet_misses_total",
                    "Requests whose ControlNet was not resident",
                    "counter",
                ),
                "loads": ("swiftdiffusion_controlnet_loads_total", "ControlNets loaded from the store", "counter"),
                "capacity": ("swiftdiffusion_controlnet_capacity", "Resident ControlNet capacity (LRU)", "gauge"),
                "resident": ("swiftdiffusion_controlnet_resident", "ControlNets resident now", "gauge"),
            },
            cfg.model_name,
        )
        self.metrics["capacity"].set(float(service.capacity))
        return service

    def execute(self, requests: list[Any]) -> list[Any]:
        import torch

        from .controlnet.service import ControlRow
        from .errors import InvalidRequestError
        from .schema import parse_names
        from .trace import trace

        def parse(request: Any) -> Any:
            t = read_tensors(request, self.inputs, self.pb)
            if "CONTROLNET_NAME" not in t:
                raise InvalidRequestError("CONTROLNET_NAME", "is required")
            names = parse_names(t, "CONTROLNET_NAME")
            if "HINT_IMAGE" in t:
                return ("prepare", list(names), t["HINT_IMAGE"])
            names = set(names)
            missing = [k for k in ("HINT_FILE", "SCALE", "SAMPLE", "TIMESTEP", "ENCODER_HIDDEN_STATES") if k not in t]
            if missing or len(names) != 1:
                raise InvalidRequestError(
                    missing[0] if missing else "CONTROLNET_NAME",
                    "step requests need one ControlNet and HINT_FILE, SCALE, SAMPLE, TIMESTEP, ENCODER_HIDDEN_STATES",
                )
            hints = set(parse_names(t, "HINT_FILE"))
            tensor = {k: torch.from_numpy(np.array(v)) for k, v in t.items() if v.dtype != np.object_}
            row = ControlRow(
                names.pop(),
                hints.pop(),
                *(tensor[k] for k in ("SAMPLE", "TIMESTEP", "ENCODER_HIDDEN_STATES", "SCALE")),
                text_embeds=tensor.get("TEXT_EMBEDS"),
                time_ids=tensor.get("TIME_IDS"),
            )
            self.stage.validate(row)
            return ("step", row)

        def compute_many(items: list[Any]) -> list[dict[str, Any]]:
            out: list[Any] = [None] * len(items)
            steps = [i for i, item in enumerate(items) if item[0] == "step"]
            for i, item in enumerate(items):
                if item[0] == "prepare":
                    try:
                        files = [self.stage.prepare(n, img) for n, img in zip(item[1], item[2], strict=True)]
                        out[i] = {"HINT_FILE": np.array([[f.encode()] for f in files], dtype=np.object_)}
                    except Exception as exc:  # noqa: BLE001 - this request alone fails
                        out[i] = exc
            if steps:
                trace("controlnet_step_start", rows=len(steps))
                residuals = self.stage.step_many([items[i][1] for i in steps])
                trace("controlnet_step_end")
                for i, r in zip(steps, residuals, strict=True):
                    out[i] = {"RESIDUALS": r.numpy()}
            self._report()
            return out

        return respond_batched(requests, parse, compute_many, self.pb)

    def _report(self) -> None:
        self.report_counters(self.stage.stats, ("hits", "misses", "loads"))
        self.metrics["resident"].set(float(len(self.stage._models)))


class BaselineModel(_StageModel):
    """Baseline ``txt2img`` (``baseline_repository/``): the stock diffusers pipeline, same contract as ours."""

    from .baseline import INPUTS as inputs

    def build(self, cfg: StageConfig) -> Any:
        from .baseline import BaselinePipeline

        return BaselinePipeline(cfg)
