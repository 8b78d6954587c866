"""Soak: thousands of mixed requests against one server, and what grew meanwhile.

The mix (deterministic per seed): plain requests over every scheduler and several sizes, LoRAs, ControlNets, both,
bad inputs (each must be refused naming its field), and client cancellations (a deadline far shorter than the
generation: the client gives up, the server must drop the work). It reports errors by kind, each stage's resident
memory, the ``/dev/shm`` entries and open descriptors of the server and its stubs at the start (after a warm-up
that loads every adapter once) and at the end, and re-runs a sample of the requests alone to check that each image
equals its solo result (requests whose LoRAs may land after step 0 are checked against their bound instead: where
they land depends on load timing, by design). ``scripts/soak.py`` runs it; a short run is a CI test
(``tests/test_soak_integration.py``).

With ``chaos_every_s`` (``scripts/soak.py --chaos N``) a thread also kills (SIGKILL) the process of a random stage
every N seconds; the report then counts, of the requests in flight at a kill, how many still got their image,
the errors by kind (a stage that stayed down too long is ``UNAVAILABLE`` naming it), and the longest time from a
kill to the end of a request that was in flight at it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..schedulers import SCHEDULER_NAMES, is_available
from ..schema import GenerationRequest
from ..serving.server import TritonServer
from ..serving.watchdog import stub_processes
from .workload import synthetic_hints

LORAS = ("pastel_peft", "ink_kohya", "glow_kohya")
CONTROLNETS = ("edges", "depth")
SIZES = (64, 96, 128)
#: Bad inputs: the field the error must name, and the request fields that make it bad.
BAD: tuple[tuple[str, dict[str, Any]], ...] = (
    ("STEPS", {"steps": 0}),
    ("LORA_NAMES", {"lora_names": ("no_such_lora",)}),
    ("CONTROLNET_NAMES", {"controlnet_names": ("no_such_cn",)}),  # with a hint image of the right size
    ("WIDTH", {"width": 100}),
    ("PROMPT", {"prompt": " "}),
    ("GUIDANCE_SCALE", {"guidance_scale": float("nan")}),
    ("STEPS", {"steps": 2, "scheduler": "pndm"}),  # PNDM needs >= 4 (found by this soak: it was an INTERNAL error)
)


@dataclass(frozen=True)
class Job:
    """One soak request: what it sends, and what must come back (``expect``: ``ok``, ``cancel`` or a field)."""

    number: int
    request: GenerationRequest
    expect: str
    timeout_s: float | None = None


def make_jobs(n: int, seed: int = 0) -> list[Job]:
    """``n`` mixed jobs: 10 % bad inputs, 5 % cancellations, the rest plain / LoRA / ControlNet / both."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        size = rng.choice(SIZES)
        base: dict[str, Any] = {
            "prompt": f"soak {i % 17}",
            "seed": rng.randrange(1 << 20),
            "scheduler": (scheduler := rng.choice([n for n in SCHEDULER_NAMES if is_available(n)])),
            "steps": rng.randint(4 if scheduler == "pndm" else 2, 4),
            "height": size,
            "width": size,
        }
        roll = rng.random()
        if roll < 0.10:
            fld, fields = BAD[i % len(BAD)]
            if "controlnet_names" in fields:
                fields = {**fields, "controlnet_images": synthetic_hints(1, size)}
            jobs.append(Job(i, GenerationRequest(**{**base, **fields}), fld))
            continue
        if roll < 0.15:  # a long generation the client abandons after 50 ms
            jobs.append(Job(i, GenerationRequest(**{**base, "steps": 40, "height": 128, "width": 128}), "cancel", 0.05))
            continue
        kind = rng.choice(("plain", "lora", "controlnet", "both"))
        if kind in ("lora", "both"):
            names = tuple(rng.sample(LORAS, rng.randint(1, 2)))
            base |= {"lora_names": names, "lora_scales": tuple(round(rng.uniform(0.3, 1.0), 2) for _ in names)}
            base["lora_bound_k"] = rng.choice((0, 1))
        if kind in ("controlnet", "both"):
            names = tuple(rng.sample(CONTROLNETS, rng.randint(1, 2)))
            hints = synthetic_hints(len(names), size)
            base |= {"controlnet_names": names, "controlnet_images": hints, "controlnet_scales": (0.8,) * len(names)}
        jobs.append(Job(i, GenerationRequest(**base), "ok"))
    return jobs


@dataclass
class Snapshot:
    """What the server holds at one moment."""

    rss: dict[str, int]
    shm_entries: int
    fds: dict[str, int]

    @classmethod
    def take(cls, server: TritonServer) -> Snapshot:
        assert server.process is not None
        pid = server.process.pid
        fds = {"tritonserver": _fd_count(pid)}
        for model, pids in stub_processes(pid).items():
            fds[model] = sum(_fd_count(p) for p in pids)
        entries = 0
        for path in Path("/dev/shm").iterdir():
            if server.shm_prefix in path.name:
                entries += 1 + (sum(1 for _ in path.rglob("*")) if path.is_dir() else 0)
        return cls(server.memory("Rss"), entries, fds)


@dataclass
class SoakReport:
    requests: int
    seconds: float
    outcomes: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    start: Snapshot | None = None
    end: Snapshot | None = None
    checked: int = 0
    mismatched: list[int] = field(default_factory=list)
    #: Chaos mode: (time, stage) of each kill, and (start, end, outcome) of every request.
    kills: list[tuple[float, str]] = field(default_factory=list)
    spans: list[tuple[float, float, str]] = field(default_factory=list)

    def chaos_lines(self) -> list[str]:
        """Of the requests in flight at a kill: outcomes, and the longest time from a kill to their end."""
        hit = self.in_flight_at_kills()
        kinds = Counter(o for _, o in hit)
        stages = Counter(stage for _, stage in self.kills)
        worst = max((delay for delay, _ in hit), default=0.0)
        return [
            f"kills: {len(self.kills)} ({', '.join(f'{s} {n}' for s, n in sorted(stages.items()))})",
            f"requests in flight at a kill: {len(hit)}; "
            + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
            + f"; of those to be served, got their image: {self.recovered_fraction * 100:.1f} % (target >= 95 %)",
            f"longest time from a kill to the end of a request in flight at it: {worst:.1f} s (target < 30 s)",
        ]

    def in_flight_at_kills(self) -> list[tuple[float, str]]:
        """(seconds from the last kill it saw to its end, outcome) of each request in flight at a kill."""
        out = []
        for start, end, outcome in self.spans:
            kills = [k for k, _ in self.kills if start < k < end]
            if kills:
                out.append((end - max(kills), outcome))
        return out

    @property
    def recovered_fraction(self) -> float:
        """Of the requests in flight at a kill that were to be served (not those the client cancelled itself, nor
        those refused as their inputs asked: they got their answer), the share that got its image.
        """
        hit = [o for _, o in self.in_flight_at_kills() if o != "cancelled" and not o.startswith("refused")]
        return sum(o == "ok" for o in hit) / max(1, len(hit))

    @property
    def rss_growth(self) -> float:
        """Growth of the summed resident memory of the server and its stubs, start to end (0.05 = 5 %)."""
        assert self.start and self.end
        return sum(self.end.rss.values()) / max(1, sum(self.start.rss.values())) - 1.0

    def lines(self) -> list[str]:
        assert self.start and self.end
        out = [
            f"{self.requests} requests in {self.seconds:.0f} s ({self.requests / self.seconds:.1f}/s)",
            "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
            f"unexpected errors: {len(self.unexpected)}" + "".join(f"\n  {u}" for u in self.unexpected[:10]),
            f"images equal to their solo result: {self.checked - len(self.mismatched)} of {self.checked}",
            f"{'process':<14}{'RSS start MB':>14}{'RSS end MB':>12}{'growth':>8}{'fds start':>11}{'fds end':>9}",
        ]
        for name in sorted(self.start.rss):
            a, b = self.start.rss[name], self.end.rss.get(name, 0)
            out.append(
                f"{name:<14}{a / 2**20:>14.0f}{b / 2**20:>12.0f}{(b / max(a, 1) - 1) * 100:>7.1f}%"
                f"{self.start.fds.get(name, 0):>11}{self.end.fds.get(name, 0):>9}"
            )
        out.append(f"total RSS growth: {self.rss_growth * 100:.1f} % (target <= 5 %)")
        out.append(f"/dev/shm entries of this server: {self.start.shm_entries} -> {self.end.shm_entries}")
        out.append(f"open descriptors: {sum(self.start.fds.values())} -> {sum(self.end.fds.values())}")
        return out


def run_soak(
    server: TritonServer,
    n: int,
    concurrency: int = 4,
    seed: int = 0,
    sample_every: int = 20,
    progress: Callable[[int, int], None] | None = None,
    chaos_every_s: float = 0.0,
) -> SoakReport:
    """Drive ``server`` with ``n`` mixed jobs from ``concurrency`` threads; see the module docstring."""
    from swiftdiffusion_client import Client, ClientError

    jobs = make_jobs(n, seed)
    with Client(server.grpc_url, timeout_s=120) as warm:  # every adapter once: caches filled before "start"
        for job in make_jobs(60, seed + 1):
            if job.expect == "ok":
                warm.generate(job.request)
    report = SoakReport(n, 0.0, start=Snapshot.take(server))
    images: dict[int, np.ndarray] = {}
    lock = threading.Lock()

    def one(job: Job) -> None:
        began = time.monotonic()
        with Client(server.grpc_url, timeout_s=job.timeout_s or 120) as c:
            try:
                result = c.run(job.request)
                outcome = "ok" if job.expect in ("ok", "cancel") else "unexpected"
                error = "served"
                k = job.request.lora_bound_k
                if job.request.lora_names and k is not None and not 0 <= result.lora_landed_step <= k:
                    outcome, error = "unexpected", f"LoRAs landed at step {result.lora_landed_step}, bound {k}"
                if job.expect == "ok" and job.number % sample_every == 0 and deterministic(job.request):
                    images[job.number] = result.image
            except ClientError as exc:
                outcome, error = _error_kind(exc, job), str(exc)
        with lock:
            report.spans.append((began, time.monotonic(), outcome))
            report.outcomes[outcome] += 1
            if outcome == "unexpected":
                report.unexpected.append(f"#{job.number} expected {job.expect}: {error[:300]}")
            done = sum(report.outcomes.values())
        if progress is not None and done % 100 == 0:
            progress(done, n)

    start = time.perf_counter()
    done = threading.Event()
    killer = threading.Thread(target=_chaos, args=(server, chaos_every_s, seed, report, done), daemon=True)
    if chaos_every_s > 0:
        killer.start()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, jobs))
    done.set()
    report.seconds = time.perf_counter() - start
    if chaos_every_s > 0:
        killer.join()
        _wait_all_up(server)
    time.sleep(2.0)  # cancelled generations finish dropping their state
    report.end = Snapshot.take(server)
    with Client(server.grpc_url, timeout_s=120) as solo:
        for number, image in sorted(images.items()):
            report.checked += 1
            again = solo.generate(jobs[number].request)
            if np.abs(again.astype(int) - image.astype(int)).max() > 2:
                report.mismatched.append(number)
    return report


#: The processes chaos kills: every stage (the public models hold the requests themselves).
CHAOS_SPARED = ("txt2img", "txt2img_stream", "img2img", "img2img_stream")


def _chaos(server: TritonServer, every_s: float, seed: int, report: SoakReport, done: threading.Event) -> None:
    """Kill the process of a random stage every ``every_s`` until ``done``."""
    rng = random.Random(seed)
    assert server.process is not None
    while not done.wait(every_s):
        stages = {m: p for m, p in stub_processes(server.process.pid).items() if m not in CHAOS_SPARED and p}
        if not stages:
            continue
        stage = rng.choice(sorted(stages))
        with contextlib.suppress(OSError):
            os.kill(stages[stage][0], signal.SIGKILL)
            report.kills.append((time.monotonic(), stage))


def _wait_all_up(server: TritonServer, timeout_s: float = 60.0) -> None:
    """Until every stage killed last is back (the solo re-runs and the end snapshot need them)."""
    from swiftdiffusion_client import Client

    deadline = time.monotonic() + timeout_s
    with Client(server.grpc_url, timeout_s=60) as c:
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                c.generate(GenerationRequest(prompt="up?", steps=1, height=64, width=64))
                return
            time.sleep(0.5)


def deterministic(request: GenerationRequest) -> bool:
    """Whether the image depends on the request alone: with LoRAs bounded at k > 0 the step they land at depends
    on how fast they load (by design: bounded asynchronous loading), so only the bound is checked for those.
    """
    return not request.lora_names or request.lora_bound_k == 0


def _error_kind(exc: Any, job: Job) -> str:
    """``refused <FIELD>`` / ``cancelled`` when the error is the one the job asks for, ``unavailable <stage>`` for a
    stage that stayed down too long (chaos), else ``unexpected``.
    """
    if job.expect == "cancel" and exc.status in ("StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED"):
        return "cancelled"
    if exc.status == "StatusCode.UNAVAILABLE" and "retrying the request is safe" in exc.message:
        return f"unavailable {exc.message.split(':')[0]}"
    refused = exc.status in ("StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND")
    if job.expect not in ("ok", "cancel") and refused and job.expect in exc.message:
        return f"refused {job.expect}"
    return "unexpected"


def _fd_count(pid: int) -> int:
    with contextlib.suppress(OSError):
        return len(list(Path(f"/proc/{pid}/fd").iterdir()))
    return 0
