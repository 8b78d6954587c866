"""Helpers shared by the benchmark scripts in ``scripts/``: timing, percentiles, machine facts, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summary(times: list[float]) -> dict[str, float]:
    """Median, p95 and p99 of a list of seconds."""
    arr = np.array(times)
    return {
        "median_s": statistics.median(times),
        "p95_s": float(np.percentile(arr, 95)),
        "p99_s": float(np.percentile(arr, 99)),
        "n": len(times),
    }


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_results(out_dir: str | Path, name: str, results: dict[str, Any]) -> Path:
    """``<out_dir>/<name>.json``; returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **results}, indent=2, default=str))
    return path


#: Per-step phases read from a ``unet`` trace (events of one pass share an ``id``): name -> (from, to).
STEP_PHASES = {
    "lora_switch_ms": ("unet_step_start", "unet_lora_switched"),
    "encoder_ms": ("unet_encoder_start", "unet_encoder_end"),
    "residual_wait_ms": ("unet_encoder_end", "unet_residuals_received"),
    "decoder_ms": ("unet_residuals_received", "unet_decoder_end"),
    "decoder_plain_ms": ("unet_encoder_end", "unet_decoder_end"),
    "unet_pass_ms": ("unet_step_start", "unet_decoder_end"),
}


def step_times(trace_file: Path, since: float = 0.0, until: float = float("inf")) -> dict[str, Any]:
    """Median milliseconds of each :data:`STEP_PHASES` phase over the ``unet`` passes traced in ``[since, until]``
    (the stage synchronizes the GPU before each traced time), with how many passes each median is over, and where
    the ControlNet residuals arrived (``cuda:0``: on the GPU, by DLPack; ``cpu``: host memory).
    ``decoder_plain_ms`` is the decoder half of a pass without ControlNets (no residuals to wait for).
    """
    passes: dict[str, dict[str, dict]] = {}
    for line in trace_file.read_text().splitlines() if trace_file.is_file() else []:
        event = json.loads(line)
        if event.get("id") and since <= event["t"] <= until:
            passes.setdefault(event["id"], {})[event["event"]] = event
    out: dict[str, Any] = {}
    for phase, (start, end) in STEP_PHASES.items():
        if phase == "decoder_plain_ms":
            chosen = [p for p in passes.values() if "unet_residuals_received" not in p]
        else:
            chosen = list(passes.values())
        ms = [1000 * (p[end]["t"] - p[start]["t"]) for p in chosen if start in p and end in p]
        if ms:
            out[phase] = {"median": round(statistics.median(ms), 3), "n": len(ms)}
    arrived = {d for p in passes.values() for d in p.get("unet_residuals_received", {}).get("arrived", [])}
    if arrived:
        out["residuals_arrived_on"] = sorted(arrived)
    return out
