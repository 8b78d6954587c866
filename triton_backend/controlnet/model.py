"""Triton model ``controlnet``: the shared ControlNet service (``model_repository/controlnet/1/model.py``)."""

from __future__ import annotations

from typing import Any

import torch

from ..config import StageConfig
from ..serving.events import trace
from ..serving.io import Tensors, read_tensors, respond_batched
from ..serving.models import MetricsModel
from . import wire
from .service import ControlNetService, ControlRow

#: Config data types of ``RESIDUALS`` and the torch dtype they are sent in.
RESIDUAL_DTYPES = {"TYPE_FP32": torch.float32, "TYPE_FP16": torch.float16}


class ControlNetModel(MetricsModel):
    """``controlnet``: shared ControlNet service. *prepare*: ``CONTROLNET_NAME [b, 1]``, ``HINT_IMAGE [b, H, W, 3]``
    → ``HINT_FILE [b, 1]``; *step*: ``CONTROLNET_NAME``, ``HINT_FILE``, ``SCALE [b, 1]``, ``SAMPLE``, ``TIMESTEP``,
    ``ENCODER_HIDDEN_STATES`` → ``RESIDUALS [b, N]`` (every skip residual and the mid residual, packed).
    """

    role = "controlnet"
    inputs = wire.INPUTS

    def build(self, cfg: StageConfig) -> ControlNetService:
        service = ControlNetService.from_config(cfg)
        # Residuals cross to the UNet in the dtype the config declares (TYPE_FP16 in the GPU fp16 layout: half the
        # bytes of the largest per-step tensor).
        declared = self.pb.get_output_config_by_name(self.model_config, "RESIDUALS")["data_type"]
        service.residual_dtype = RESIDUAL_DTYPES[declared]
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
                **self.cache_metric_specs("hint", "hint_cache", "Hint embeddings"),
            },
            cfg.model_name,
        )
        self.metrics["capacity"].set(float(service.capacity))
        return service

    def parse(self, request: Any) -> wire.HintPrepare | ControlRow:
        item = wire.parse_request(read_tensors(request, self.inputs, self.pb))
        if isinstance(item, ControlRow):
            self.stage.validate(item)
        return item

    def prepare(self, item: wire.HintPrepare) -> Tensors | Exception:
        try:
            files = [self.stage.prepare(n, img) for n, img in zip(item.names, item.images, strict=True)]
        except Exception as exc:  # noqa: BLE001 - this request alone fails
            return exc
        return {"HINT_FILE": wire.hint_files_tensor(files)}

    def compute_many(self, items: list[wire.HintPrepare | ControlRow]) -> list[Tensors | Exception]:
        out: list[Tensors | Exception] = [
            self.prepare(item) if isinstance(item, wire.HintPrepare) else {} for item in items
        ]
        steps = [i for i, item in enumerate(items) if isinstance(item, ControlRow)]
        if steps:
            trace("controlnet_step_start", rows=len(steps))
            residuals = self.stage.step_many([items[i] for i in steps])
            trace("controlnet_step_end")
            for i, r in zip(steps, residuals, strict=True):
                out[i] = {"RESIDUALS": r}  # (a torch tensor: on a GPU it stays there, io.output_tensor)
        self.report_counters(self.stage.stats, ("hits", "misses", "loads"))
        self.metrics["resident"].set(float(self.stage.resident))
        self.report_cache("hint", self.stage.hint_cache)
        return out

    def execute(self, requests: list[Any]) -> list[Any]:
        return respond_batched(requests, self.parse, self.compute_many, self.pb)
