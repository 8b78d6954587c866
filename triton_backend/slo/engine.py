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
from typing import Any, TypeVar

from ..errors import DeadlineExceededError, StageUnavailableError
from ..serving.events import trace
from .policy import AdaptiveConcurrency, Job, StepPolicy

T = TypeVar("T")


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
    def from_params(cls, params: dict[str, Any]) -> StepScheduler:
        """From ``denoise``'s typed parameters (:mod:`triton_backend.parameters`): ``max_active`` (``auto`` or
        >= 1), ``max_pending``, ``default_deadline_ms``, ``late_policy``.
        """
        fixed = None if params["max_active"] == "auto" else int(params["max_active"])
        return cls(
            StepPolicy(AdaptiveConcurrency(fixed=fixed)),
            max_pending=params["max_pending"],
            late_policy=params["late_policy"],
            default_deadline_ms=params["default_deadline_ms"],
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
