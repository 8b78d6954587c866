"""Production-like load: trace generation (Poisson arrivals, adapter counts, Zipf popularity) and async replay.

A trace is JSON lines: ``{"t": seconds since start, "seed", "controlnets": [names], "loras": [names]}``. Popularity
over ``n_controlnets``/``n_loras`` distinct adapters is Zipf-skewed so caches matter; the replayer makes the
adapters exist (copies of the default ones under the trace's names) and drives a server over async gRPC.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..schema import GenerationRequest


@dataclass(frozen=True)
class TraceSpec:
    rate: float = 1.0  # requests per second (Poisson)
    duration_s: float = 30.0
    controlnet_counts: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1)  # P(0..3 ControlNets)
    lora_counts: tuple[float, ...] = (0.4, 0.4, 0.2)  # P(0..2 LoRAs)
    n_controlnets: int = 6
    n_loras: int = 10
    zipf_s: float = 1.1
    seed: int = 0
    #: Stop after this many requests (0 = as many as ``duration_s`` holds).
    max_requests: int = 0


def _zipf_choice(rng: np.random.Generator, n: int, k: int, s: float, prefix: str) -> list[str]:
    weights = 1.0 / np.arange(1, n + 1) ** s
    picks = rng.choice(n, size=min(k, n), replace=False, p=weights / weights.sum())
    return [f"{prefix}{i:03d}" for i in sorted(picks)]


def generate_trace(spec: TraceSpec) -> list[dict]:
    """Poisson arrivals over ``duration_s`` (or the first ``max_requests``); per request adapter counts and
    Zipf-popular names.
    """
    rng = np.random.default_rng(spec.seed)
    t, out = 0.0, list[dict]()
    while True:
        t += rng.exponential(1.0 / spec.rate)
        if (spec.max_requests and len(out) >= spec.max_requests) or (not spec.max_requests and t > spec.duration_s):
            return out
        n_cn = int(
            rng.choice(len(spec.controlnet_counts), p=np.array(spec.controlnet_counts) / sum(spec.controlnet_counts))
        )
        n_l = int(rng.choice(len(spec.lora_counts), p=np.array(spec.lora_counts) / sum(spec.lora_counts)))
        out.append(
            {
                "t": round(t, 4),
                "seed": int(rng.integers(0, 2**31)),
                "controlnets": _zipf_choice(rng, spec.n_controlnets, n_cn, spec.zipf_s, "cn"),
                "loras": _zipf_choice(rng, spec.n_loras, n_l, spec.zipf_s, "lora"),
            }
        )


def save_trace(trace: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in trace))


def load_trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def materialize_adapters(model_dir: Path, trace: list[dict]) -> None:
    """Make every adapter the trace names exist: links to the default ControlNets/LoRAs under those names."""
    cn_src = sorted((model_dir / "controlnets").iterdir())
    lora_src = sorted((model_dir / "loras").glob("*.safetensors"))
    for name in sorted({n for r in trace for n in r["controlnets"]}):
        dest = model_dir / "controlnets" / name
        if not dest.exists():
            dest.symlink_to(cn_src[int(name[2:]) % len(cn_src)].resolve(), target_is_directory=True)
    for name in sorted({n for r in trace for n in r["loras"]}):
        dest = model_dir / "loras" / f"{name}.safetensors"
        if not dest.exists():
            dest.symlink_to(lora_src[int(name[4:]) % len(lora_src)].resolve())


def synthetic_hints(n: int, size: int) -> np.ndarray | None:
    """``n`` deterministic gradient hint images ``[n, size, size, 3]`` uint8 for benchmarks (None for 0)."""
    if not n:
        return None
    yy, xx = np.indices((size, size))
    return np.stack([np.stack([(xx * (i + 1) + yy) % 256] * 3, -1).astype(np.uint8) for i in range(n)])


def to_request(record: dict, steps: int, size: int, deadline_ms: int | None = None) -> GenerationRequest:
    hints = synthetic_hints(len(record["controlnets"]), size)
    return GenerationRequest(
        deadline_ms=deadline_ms,
        prompt="a photo of an astronaut riding a horse",
        seed=record["seed"],
        steps=steps,
        height=size,
        width=size,
        controlnet_names=tuple(record["controlnets"]),
        controlnet_images=hints,
        lora_names=tuple(record["loras"]),
    )


async def replay(
    url: str, trace: list[dict], steps: int, size: int, slo_s: float, model: str = "txt2img", deadline: bool = True
) -> dict:
    """Send each request at its arrival time (open loop); report throughput, p50/p99 and SLO attainment.

    Every request carries ``DEADLINE_MS`` = the SLO when ``deadline`` (a server that does not schedule by deadline
    ignores it). Attainment counts over every request sent: an error or a refusal is a miss. ``goodput_rps`` is the
    rate of requests that met the SLO.
    """
    import tritonclient.grpc.aio as aio

    from ..schema import FIELDS_BY_NAME

    client = aio.InferenceServerClient(url)
    latencies: list[float] = []
    #: Per request, in trace order: its latency (None: failed) and adapter counts, to read which requests missed.
    each: list[dict] = [{"t": r["t"], "controlnets": len(r["controlnets"]), "loras": len(r["loras"])} for r in trace]
    errors = 0
    start = time.perf_counter()

    async def one(record: dict, row: dict) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, record["t"] - (time.perf_counter() - start)))
        inputs = []
        request = to_request(record, steps, size, round(slo_s * 1000) if deadline else None)
        for name, value in request.to_tensors().items():
            tensor = aio.InferInput(name, list(value.shape), FIELDS_BY_NAME[name].triton_dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        t0 = time.perf_counter()
        try:
            await client.infer(model, inputs)
            latencies.append(time.perf_counter() - t0)
            row["latency_s"] = round(latencies[-1], 4)
        except Exception as e:  # noqa: BLE001 - counted, reported
            errors += 1
            row["error"] = str(e).splitlines()[0][:200]

    await asyncio.gather(*(one(r, row) for r, row in zip(trace, each, strict=True)))
    wall = time.perf_counter() - start
    await client.close()
    arr = np.array(latencies) if latencies else np.array([np.nan])
    met = int(np.sum(arr <= slo_s))
    return {
        "requests": len(trace),
        "errors": errors,
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall,
        "goodput_rps": met / wall,
        "p50_s": float(np.percentile(arr, 50)),
        "p99_s": float(np.percentile(arr, 99)),
        "slo_s": slo_s,
        "slo_attainment": met / max(1, len(trace)),
        "requests_detail": each,
    }
