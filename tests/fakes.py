"""Stand-ins that tests and benchmarks plug into the real stages through their real extension points.

:class:`SlowLoraStore` is a ``lora_manager`` store (parameter ``lora_store``): the stage's process imports it by
name, so its settings travel in the parameter's value as options, never through the environment::

    lora_store = "tests.fakes:SlowLoraStore?delay_s=1.0"                 # every request waits 1 s (hits too)
    lora_store = "tests.fakes:SlowLoraStore?latency_ms=50&mbps=100"      # EMULATED network storage on each miss

(:func:`slow_lora_store` writes these values.) The stubs import ``tests.fakes`` because the repository root is on
their ``PYTHONPATH`` (:func:`triton_backend.serving.server.server_env`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from triton_backend.lora.store import CacheEntry, LoraStore


class SlowLoraStore(LoraStore):
    """The file store, slowed down. Options (strings, as the parameter passes them; 0 = off):

    * ``delay_s``: every request waits this long after its LoRAs are resolved, cache hits included, once per
      request (outside the store's lock): the landing step of a test request is then always its bound k;
    * ``latency_ms`` and ``mbps``: every cache miss first waits latency + file size / bandwidth (megabits per
      second), as a read from network storage would (inside the store's lock, counted in ``load_seconds``).
    """

    def __init__(
        self, *args: Any, delay_s: float | str = 0, latency_ms: float | str = 0, mbps: float | str = 0, **kwargs: Any
    ):
        self.delay_s = float(delay_s)  # (read first: a bad value fails before the store makes its directory)
        self.latency_s = float(latency_ms) / 1000
        self.bandwidth_bps = float(mbps) * 1e6 / 8
        super().__init__(*args, **kwargs)

    def get_many(self, names: Sequence[str]) -> list[CacheEntry]:
        entries = super().get_many(names)
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        return entries

    def load(self, path: Path) -> dict[str, torch.Tensor]:
        delay = self.latency_s
        if self.bandwidth_bps > 0:
            delay += path.stat().st_size / self.bandwidth_bps
        if delay > 0:
            time.sleep(delay)
        return super().load(path)


def slow_lora_store(delay_s: float = 0, latency_ms: float = 0, mbps: float = 0) -> str:
    """The ``lora_store`` parameter value of a :class:`SlowLoraStore` with these options (those at 0 left out)."""
    options = {"delay_s": delay_s, "latency_ms": latency_ms, "mbps": mbps}
    query = "&".join(f"{key}={value}" for key, value in options.items() if value)
    return "tests.fakes:SlowLoraStore" + (f"?{query}" if query else "")
