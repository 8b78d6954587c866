"""SLO-aware step scheduling: which generations advance, decided at every step boundary (pure logic, no I/O).

A generation is a chain of dependent steps. When more generations step at once than batching turns into
throughput, every one of them slows down and all finish late (processor sharing): under a latency SLO that is worse
than first-come-first-served. So (docs/architecture.md "Scheduling under load"):

* **Admission control.** At most ``limit`` generations are *active* (may have a step in flight); the rest wait with
  their state intact. ``limit`` is measured, not configured (:class:`AdaptiveConcurrency`): it grows while one more
  active generation still adds at least ``gain`` throughput (a GPU below its batch knee) and shrinks when it does
  not (a saturated CPU), so the same policy is right on both.
* **Order.** Waiting generations are ranked by :meth:`StepPolicy.key`: those that can still meet their deadline first,
  earliest deadline first among them (EDF), then least remaining work, then arrival. A generation whose deadline can
  no longer be met goes behind every feasible one (it is still served, or refused when the deployment says so).
* **Preemption at step boundaries.** When a waiting generation ranks before an active one, the active one yields at
  its next step boundary (GenServe-style); its state stays in memory, so nothing is recomputed.

The engine (:mod:`triton_backend.slo.engine`) calls :meth:`StepPolicy.submit`, :meth:`StepPolicy.step_done` and
:meth:`StepPolicy.finish`; each returns the jobs it admitted, which the engine then lets run.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Job:
    """The policy's view of one generation request."""

    arrival: float
    #: Absolute time (the policy's clock) by which it should finish; ``math.inf`` = no deadline.
    deadline: float
    total_steps: int
    #: Relative cost of one step: UNet rows x latent pixels x (1 + ControlNets). Step times are measured per unit.
    cost: float = 1.0
    #: Unique per process, for traces (``id()`` is reused once a job is freed).
    number: int = field(default_factory=itertools.count().__next__)
    done_steps: int = 0
    #: Set by the policy: admitted (may step) or waiting.
    active: bool = False
    #: Waiting for something other than the UNet (its LoRAs, its hint embeddings): neither active nor queued.
    blocked: bool = False
    preemptions: int = 0

    @property
    def remaining(self) -> int:
        return self.total_steps - self.done_steps


@dataclass
class AdaptiveConcurrency:
    """How many generations may step at once, found by measuring throughput at each level.

    Throughput at a level is measured over windows: ``window`` consecutive steps completed while exactly ``limit``
    generations were active give ``cost units / busy seconds`` for that level (EWMA over windows), where busy time
    is the union of the steps' intervals: overlapping steps count once (so two at a time that each take twice as
    long add nothing), idle gaps between requests not at all. After each full window :meth:`adjust` moves the limit:
    down by one when nothing is queued (latency first) or when this level is not ``1 + gain`` times as productive
    as the one below, else up by one while generations queue and the next level is unmeasured, stale or was at
    least ``1 + gain`` times as productive. A window is abandoned when a step ran at another level than the limit
    (the level was not really measured). ``fixed`` pins the limit (config ``max_active``).

    A level is stale after ``reprobe`` windows at the limit below it. Each probe that finds a level no better than
    the one below doubles that interval (up to ``max_reprobe``): a probe costs latency exactly when requests queue
    (on a saturated CPU two interleaved generations each run at half speed), so hardware where batching never pays
    is re-checked ever more rarely. A probe that pays resets it.
    """

    minimum: int = 1
    maximum: int = 16
    gain: float = 0.25
    window: int = 8
    reprobe: int = 8
    max_reprobe: int = 256
    fixed: int | None = None
    #: EWMA weight of a new window.
    alpha: float = 0.5
    limit: int = field(init=False)
    #: level → EWMA cost units completed per second with that many generations active.
    rate: dict[int, float] = field(default_factory=dict)
    #: level → EWMA seconds per cost unit of one step at that level (deadline estimates of a new kind of step).
    unit_seconds: dict[int, float] = field(default_factory=dict)
    #: (level, cost) → EWMA seconds of one step (deadline estimates): step time is not proportional to the cost
    #: model (a ControlNet costs less than a second UNet), so each kind of step seen is timed on its own.
    step_time: dict[tuple[int, float], float] = field(default_factory=dict)
    _window_cost: float = 0.0
    _window_steps: int = 0
    _window_busy: float = 0.0
    _busy_until: float = 0.0
    _full: bool = False
    _windows_at_limit: int = 0
    _reprobe_after: int = field(init=False)

    def __post_init__(self) -> None:
        self.limit = self.fixed if self.fixed is not None else self.minimum
        self._reprobe_after = self.reprobe

    def observe(self, level: int, cost: float, seconds: float, now: float) -> None:
        """One step of ``cost`` took ``seconds`` and finished at ``now`` with ``level`` generations active."""
        _ewma(self.unit_seconds, level, seconds / max(cost, 1e-9))
        if len(self.step_time) >= 1024:  # a bound: kinds of step are few (shapes x ControlNets x guidance)
            self.step_time.clear()
        _ewma(self.step_time, (level, cost), seconds)
        start = now - seconds
        busy = max(0.0, now - max(start, self._busy_until))
        self._busy_until = max(self._busy_until, now)
        if level != self.limit:
            self._restart(now)
            return
        self._window_cost += cost
        self._window_steps += 1
        self._window_busy += busy
        if self._window_steps >= self.window:
            rate = self._window_cost / max(self._window_busy, 1e-9)
            old_rate = self.rate.get(level)
            self.rate[level] = rate if old_rate is None else (1 - self.alpha) * old_rate + self.alpha * rate
            self._full = True
            self._restart(now)

    def _restart(self, now: float) -> None:
        self._window_cost, self._window_steps, self._window_busy = 0.0, 0, 0.0

    def throughput(self, level: int) -> float | None:
        """Cost units completed per second with ``level`` generations active (``None``: unmeasured)."""
        return self.rate.get(level)

    def step_seconds(self, cost: float) -> float | None:
        """Expected duration of one step of ``cost`` at the current limit: as measured for this kind of step, else
        from the seconds per cost unit (``None`` before any measurement).
        """
        measured = self.step_time.get((self.limit, cost))
        if measured is not None:
            return measured
        t = self.unit_seconds.get(self.limit) or next(iter(self.unit_seconds.values()), None)
        return None if t is None else t * cost

    def adjust(self, queued: int) -> None:
        """Move the limit after a full window at it; ``queued`` = generations waiting for a slot now.

        Without a queue, fewer generations at once means each finishes sooner: the limit steps down. With a queue,
        it steps up while the level above is (or may be) more productive, and down when this one is not.
        """
        if self.fixed is not None or not self._full:
            return
        self._full = False
        self._windows_at_limit += 1
        here, up, down = (self.throughput(k) for k in (self.limit, self.limit + 1, self.limit - 1))
        stale = self._windows_at_limit >= self._reprobe_after
        worse_than_below = down is not None and here is not None and here < (1 + self.gain) * down
        pays_above = up is not None and here is not None and up >= (1 + self.gain) * here
        if self.limit > self.minimum and (queued == 0 or worse_than_below):
            if worse_than_below:  # a probe that did not pay: probe again later
                self._reprobe_after = min(2 * self._reprobe_after, self.max_reprobe)
            self._move(-1)
        elif queued > 0 and self.limit < self.maximum and (up is None or here is None or stale or pays_above):
            if pays_above:
                self._reprobe_after = self.reprobe
            self._move(+1)

    def _move(self, delta: int) -> None:
        self.limit += delta
        self._windows_at_limit = 0


@dataclass
class StepPolicy:
    """Admission, order and preemption for every generation of one ``denoise`` instance."""

    concurrency: AdaptiveConcurrency = field(default_factory=AdaptiveConcurrency)
    clock: Callable[[], float] = time.monotonic
    jobs: list[Job] = field(default_factory=list)

    @property
    def active(self) -> list[Job]:
        return [j for j in self.jobs if j.active]

    @property
    def waiting(self) -> list[Job]:
        return [j for j in self.jobs if not j.active and not j.blocked]

    def estimated_finish(self, job: Job, now: float | None = None) -> float:
        """When ``job`` would finish if it stepped from now on without waiting (``now`` if nothing is measured)."""
        now = self.clock() if now is None else now
        step = self.concurrency.step_seconds(job.cost)
        return now + (job.remaining * step if step is not None else 0.0)

    def feasible(self, job: Job, now: float | None = None) -> bool:
        return self.estimated_finish(job, now) <= job.deadline

    def key(self, job: Job, now: float) -> tuple[bool, float, float, float]:
        """Rank (smaller first): feasible before infeasible, earliest deadline, least remaining work, arrival."""
        return (not self.feasible(job, now), job.deadline, job.remaining * job.cost, job.arrival)

    def submit(self, job: Job) -> list[Job]:
        """A new generation; returns the jobs admitted now (possibly ``job``)."""
        self.jobs.append(job)
        return self._fill()

    def step_done(self, job: Job, seconds: float, level: int) -> list[Job]:
        """``job`` finished a step that took ``seconds`` with ``level`` generations active. Returns the jobs admitted
        now; ``job`` itself may have been preempted (``job.active`` is then False: it waits to be admitted again).
        """
        job.done_steps += 1
        now = self.clock()
        self.concurrency.observe(level, job.cost, seconds, now)
        self.concurrency.adjust(queued=len(self.waiting))
        active = sorted(self.active, key=lambda j: self.key(j, now))
        # Over the limit (it shrank): the worst-ranked active generation yields; else yield to a better waiting one.
        over = len(active) > self.concurrency.limit and active[-1] is job
        better = any(self.key(w, now) < self.key(job, now) for w in self.waiting)
        if job.remaining > 0 and (over or better):
            job.active = False
            job.preemptions += 1
        return self._fill()

    def block(self, job: Job) -> list[Job]:
        """``job`` waits for something else (a LoRA load, hint embeddings): it gives up its slot meanwhile."""
        job.active, job.blocked = False, True
        return self._fill()

    def unblock(self, job: Job) -> list[Job]:
        """``job`` can step again: it queues with its rank (and is admitted at once if a slot is free)."""
        job.blocked = False
        return self._fill()

    def finish(self, job: Job) -> list[Job]:
        """``job`` completed, failed or was cancelled; returns the jobs admitted in its place."""
        if job in self.jobs:
            self.jobs.remove(job)
        job.active = False
        return self._fill()

    def _fill(self) -> list[Job]:
        now = self.clock()
        admitted = []
        waiting = sorted(self.waiting, key=lambda j: self.key(j, now))
        free = self.concurrency.limit - len(self.active)
        for job in waiting[: max(0, free)]:
            job.active = True
            admitted.append(job)
        return admitted


def _ewma(table: dict, key: object, value: float, weight: float = 0.25) -> None:
    old = table.get(key)
    table[key] = value if old is None else (1 - weight) * old + weight * value


def deadline_from(arrival: float, deadline_ms: int | None, default_ms: int) -> float:
    """Absolute deadline: the request's ``DEADLINE_MS`` (or the deployment's default) after ``arrival``; none = inf."""
    ms = deadline_ms if deadline_ms else default_ms
    return arrival + ms / 1000.0 if ms > 0 else math.inf
