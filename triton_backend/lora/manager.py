"""Stage ``lora_manager``: names → converted adapters (files the UNet/text-encoder processes map).

Runs as its own Triton model, so conversion (the load-heavy part: storage → host memory → per-layer factors) runs
while ``denoise`` is already stepping without the LoRAs (bounded asynchronous loading).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from ..config import StageConfig, budget_param, float_param
from ..paths import lora_dir
from ..schema import parse_names
from .convert import convert_lora_file, load_skeletons
from .store import LoraStore

#: Test-only: seconds every manager response is delayed, so tests can make the landing step deterministic.
TEST_DELAY_ENV = "SWIFTDIFFUSION_LORA_TEST_DELAY_S"


class LoraManager:
    """Owns the store and the conversion skeletons (the UNet and text encoder(s) of the served model)."""

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg
        #: Conversion skeletons by diffusers component name.
        self.components = load_skeletons(cfg)
        self.store = LoraStore(
            root=lora_dir(cfg.params, cfg.model_dir),
            convert=self._convert,
            budget_bytes=budget_param(cfg.model_name, cfg.params, "cache_budget_mb", 1024),
            emulate_latency_s=float_param(cfg.model_name, cfg.params, "emulate_storage_latency_ms", 0) / 1000.0,
            emulate_bandwidth_bps=float_param(cfg.model_name, cfg.params, "emulate_storage_mbps", 0) * 1e6 / 8,
        )
        self.test_delay_s = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)

    def _convert(self, path: Path) -> dict[str, torch.Tensor]:
        with self.cfg.compute():
            return convert_lora_file(path, self.components)

    def handle(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``LORA_NAMES [m]`` → ``LORA_FILES [m]`` (BYTES paths) and ``LORA_TEXT_ENCODER [m]`` (BOOL)."""
        names = parse_names(tensors, "LORA_NAMES")
        entries = [self.store.get(name) for name in names]
        if self.test_delay_s:
            time.sleep(self.test_delay_s)
        return {
            "LORA_FILES": np.array([str(e.file).encode() for e in entries], dtype=np.object_),
            "LORA_TEXT_ENCODER": np.array([e.has_text_encoder for e in entries], dtype=bool),
        }

    def close(self) -> None:
        self.store.close()
