"""The step scheduler on an event loop: every generation of a ``denoise`` instance is a coroutine that asks
:class:`StepScheduler` before each UNet step; :class:`~triton_backend.slo.policy.StepPolicy` decides who may go.

All methods run on one event loop (the instance's BLS client loop), so the policy needs no lock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from ..config import int_param
from ..errors import ConfigError, DeadlineExceededError, StageUnavailableError
from ..serving.events import trace
from .policy import AdaptiveConcurrency, Job, StepPolicy

T = TypeVar("T")

#: ``late_policy`` values: a request that can no longer meet its deadline is still served, or refused at once.
LATE_POLICIES = ("serve", "reject")


@dataclass
class StepScheduler:
    """Admission and order of the generations of one ``denoise`` instance (see :mod:`triton_backend.slo.policy`)."""

    policy: StepPolicy = field(default_factory=StepPolicy)
    #: Generations this instance holds at most (active + waiting); beyond it a request is refused (UNAVAILABLE).
    max_pending: int = 64
    late_policy: str = "serve"
    #: Deadline of a request without ``DEADLINE_MS`` (ms after arrival; 0 = none).
    default_deadline_ms: int = 0
    _admitted: dict[Job, asyncio.Event] = field(default_factory=dict)

    @classmethod
    def from_params(cls, model: str, params: dict[str, str]) -> StepScheduler:
        """``denoise`` config parameters ``max_active`` (``auto`` or >= 1), ``max_pending``, ``default_deadline_ms``,
        ``late_policy``; a bad value fails the load naming it.
        """
        raw = params.get("max_active", "auto") or "auto"
        fixed = None if raw == "auto" else int_param(model, params, "max_active", 1, minimum=1)
        late = params.get("late_policy", "serve") or "serve"
        if late not in LATE_POLICIES:
            raise ConfigError(f"{model}: parameter late_policy={late!r}; allowed: {', '.join(LATE_POLICIES)}")
        return cls(
            StepPolicy(AdaptiveConcurrency(fixed=fixed)),
            max_pending=int_param(model, params, "max_pending", 64, minimum=1),
            late_policy=late,
            default_deadline_ms=int_param(model, params, "default_deadline_ms", 0, minimum=0),
        )

    def _wake(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._admitted[job].set()

    async def _wait_admitted(self, job: Job) -> None:
        event = self._admitted[job]
        if not job.active:
            event.clear()
        await event.wait()

    @asynccontextmanager
    async def generation(self, job: Job) -> AsyncIterator[Job]:
        """Hold ``job`` for the duration of its generation; it waits here until first admitted."""
        if len(self.policy.jobs) >= self.max_pending:
            raise StageUnavailableError(
                f"denoise: {len(self.policy.jobs)} generations in progress (max_pending); retry later"
            )
        self._admitted[job] = asyncio.Event()
        trace("slo_submit", job=job.number, steps=job.total_steps, cost=job.cost, deadline=job.deadline - job.arrival)
        try:
            self._wake(self.policy.submit(job))
            await self._wait_admitted(job)
            trace("slo_admitted", job=job.number, limit=self.policy.concurrency.limit)
            if self.late_policy == "reject" and not self.policy.feasible(job):
                late = self.policy.estimated_finish(job) - job.deadline
                raise DeadlineExceededError(f"cannot finish within its deadline (about {late:.2f} s late); not started")
            yield job
        finally:
            self._wake(self.policy.finish(job))
            del self._admitted[job]
            trace("slo_finish", job=job.number, done=job.done_steps, preemptions=job.preemptions)

    async def outside(self, job: Job, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` (a LoRA load, hint embeddings) without holding a slot; re-queue when it is done."""
        self._wake(self.policy.block(job))
        trace("slo_block", job=job.number)
        try:
            return await awaitable
        finally:
            trace("slo_unblock", job=job.number)
            self._wake(self.policy.unblock(job))

    async def step(self, job: Job, run: Callable[[], Awaitable[T]]) -> T:
        """Run one step of ``job`` once it is admitted; report its duration; yield if the policy preempts it."""
        await self._wait_admitted(job)
        level = len(self.policy.active)
        start = time.perf_counter()
        result = await run()
        seconds = time.perf_counter() - start
        trace("slo_step", job=job.number, level=level, seconds=seconds, limit=self.policy.concurrency.limit)
        self._wake(self.policy.step_done(job, seconds, level))
        return result
