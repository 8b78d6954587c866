"""Triton model ``lora_manager``: the LoRA store and converter (``model_repository/lora_manager/1/model.py``)."""

from __future__ import annotations

from typing import Any

from ..config import StageConfig
from ..serving.io import Tensors
from ..serving.models import MetricsModel
from .manager import LoraManager


class LoraManagerModel(MetricsModel):
    """``lora_manager``: ``LORA_NAMES [m]`` → ``LORA_FILES [m]`` (converted factor files) and
    ``LORA_TEXT_ENCODER [m]`` (BOOL); cache hits/misses/load seconds/bytes resident are Triton metrics.
    """

    role = "lora_manager"

    inputs = ("LORA_NAMES",)

    def build(self, cfg: StageConfig) -> LoraManager:
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

    def handle(self, tensors: Tensors, request: Any) -> Tensors:
        try:
            return self.stage.handle(tensors)
        finally:
            self.report_counters(self.stage.store.stats, ("hits", "misses", "load_seconds"))
            self.metrics["bytes_resident"].set(float(self.stage.store.stats.bytes_resident))
