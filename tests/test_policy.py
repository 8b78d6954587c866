"""``slo.policy``: admission, order, preemption and the measured concurrency limit (pure logic, no server)."""

from __future__ import annotations

import math

import pytest

from triton_backend.slo.policy import AdaptiveConcurrency, Job, StepPolicy, deadline_from


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def policy(limit: int | None = 1, **kwargs) -> tuple[StepPolicy, Clock]:
    clock = Clock()
    return StepPolicy(AdaptiveConcurrency(fixed=limit, **kwargs), clock=clock), clock


def job(arrival=0.0, deadline=math.inf, steps=10, cost=1.0) -> Job:
    return Job(arrival=arrival, deadline=deadline, total_steps=steps, cost=cost)


def test_admits_up_to_the_limit_and_the_rest_wait():
    p, _ = policy(limit=2)
    a, b, c = job(0), job(1), job(2)
    assert p.submit(a) == [a] and p.submit(b) == [b] and p.submit(c) == []
    assert p.active == [a, b] and p.waiting == [c]
    assert p.finish(a) == [c] and c.active


def test_earliest_deadline_first_among_waiting():
    p, _ = policy(limit=1)
    running = job(0, deadline=100)
    p.submit(running)
    late, soon = job(1, deadline=50), job(2, deadline=10)
    p.submit(late)
    p.submit(soon)
    assert p.finish(running) == [soon]


def test_same_slo_for_everyone_is_first_come_first_served():
    p, _ = policy(limit=1)
    jobs = [job(t, deadline=t + 3.0) for t in (0.0, 0.1, 0.2, 0.3)]
    for j in jobs:
        p.submit(j)
    order = []
    while p.jobs:
        current = p.active[0]
        order.append(current)
        p.finish(current)
    assert order == jobs


def test_step_boundary_preemption_when_a_more_urgent_request_arrives():
    p, _ = policy(limit=1)
    relaxed = job(0, deadline=100)
    p.submit(relaxed)
    urgent = job(1, deadline=5)
    assert p.submit(urgent) == []  # no preemption mid-step
    assert p.step_done(relaxed, 0.1, level=1) == [urgent]
    assert not relaxed.active and relaxed.preemptions == 1 and relaxed.done_steps == 1
    assert p.finish(urgent) == [relaxed]


def test_no_preemption_for_an_equal_or_less_urgent_request():
    p, _ = policy(limit=1)
    first = job(0, deadline=10)
    p.submit(first)
    p.submit(job(1, deadline=11))
    assert p.step_done(first, 0.1, level=1) == [] and first.active


def test_infeasible_requests_go_behind_feasible_ones():
    p, clock = policy(limit=1)
    running = job(0, steps=2)
    p.submit(running)
    p.step_done(running, 1.0, level=1)  # measured: 1 s per step at cost 1
    doomed = job(0.5, deadline=3.0, steps=10)  # needs 10 s more
    fine = job(0.6, deadline=20.0, steps=5)
    p.submit(doomed)
    p.submit(fine)
    clock.now = 1.0
    assert not p.feasible(doomed) and p.feasible(fine)
    assert p.finish(running) == [fine]
    assert p.finish(fine) == [doomed]  # still served when nothing feasible waits


def test_least_remaining_work_breaks_deadline_ties():
    p, _ = policy(limit=1)
    blocker = job(0)
    p.submit(blocker)
    long, short = job(1, steps=50), job(2, steps=5)
    p.submit(long)
    p.submit(short)
    assert p.finish(blocker) == [short]


def test_finish_of_an_unknown_or_waiting_job_is_harmless():
    p, _ = policy(limit=1)
    a, b = job(0), job(1)
    p.submit(a)
    p.submit(b)
    assert p.finish(b) == [] and p.active == [a]
    assert p.finish(job(5)) == []


def test_a_shrinking_limit_makes_the_worst_active_job_yield():
    p, _ = policy(limit=2)
    good, worse = job(0, deadline=10), job(1, deadline=20)
    p.submit(good)
    p.submit(worse)
    p.concurrency.fixed = p.concurrency.limit = 1
    assert p.step_done(good, 0.1, level=2) == [] and good.active
    p.step_done(worse, 0.1, level=2)
    assert not worse.active and p.active == [good]


class Feeder:
    """Steps of cost 1 completing at ``rate`` units per second of wall time, at a given level."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self, c: AdaptiveConcurrency, level: int, rate: float, n: int | None = None) -> None:
        for _ in range(n or c.window):
            self.now += 1.0 / rate
            c.observe(level, 1.0, level / rate, self.now)


def test_concurrency_grows_while_batching_adds_throughput():
    c, feed = AdaptiveConcurrency(window=4), Feeder()
    assert c.limit == 1
    feed(c, 1, 1.0)
    c.adjust(queued=8)
    assert c.limit == 2  # level 2 unmeasured: probe it
    feed(c, 2, 1.7)  # a GPU below its batch knee: 1.7x the throughput
    c.adjust(queued=8)
    assert c.limit == 3


def test_concurrency_falls_back_when_batching_adds_nothing():
    """A saturated CPU: two at once complete no more work per second, so one at a time finishes each one earlier."""
    c, feed = AdaptiveConcurrency(window=4), Feeder()
    feed(c, 1, 1.0)
    c.adjust(queued=8)
    feed(c, 2, 1.1)  # +10 %: noise, not worth doubling everyone's latency
    c.adjust(queued=8)
    assert c.limit == 1
    for _ in range(3):  # settles at 1; no probing while the estimate is fresh
        feed(c, 1, 1.0)
        c.adjust(queued=8)
        assert c.limit == 1


def test_a_window_counts_only_steps_at_the_limit():
    c, feed = AdaptiveConcurrency(window=4), Feeder()
    feed(c, 1, 1.0, n=3)
    feed.now += 1
    c.observe(2, 1.0, 1.0, feed.now)  # a step at another level (demand dropped or a probe): the window restarts
    c.adjust(queued=8)
    assert c.rate == {} and c.limit == 1
    feed(c, 1, 2.0)
    assert c.rate == {1: pytest.approx(2.0)}


def test_concurrency_reprobes_a_stale_level_and_never_grows_without_a_queue():
    c, feed = AdaptiveConcurrency(window=2, reprobe=3), Feeder()
    feed(c, 1, 1.0)
    c.rate[2] = 1.0
    c.adjust(queued=8)
    assert c.limit == 1
    for _ in range(2):
        feed(c, 1, 1.0)
        c.adjust(queued=8)
    assert c.limit == 2  # third window at 1: re-measure 2
    c2, feed2 = AdaptiveConcurrency(window=2), Feeder()
    feed2(c2, 1, 1.0)
    c2.adjust(queued=0)
    assert c2.limit == 1


def test_fixed_limit_is_never_moved():
    c, feed = AdaptiveConcurrency(window=1, fixed=3), Feeder()
    feed(c, 3, 1.0, n=5)
    c.adjust(queued=10)
    assert c.limit == 3


@pytest.mark.parametrize(
    ("deadline_ms", "default_ms", "expected"), [(None, 0, math.inf), (None, 2000, 12.0), (500, 2000, 10.5)]
)
def test_deadline_from_request_or_default(deadline_ms, default_ms, expected):
    assert deadline_from(10.0, deadline_ms, default_ms) == expected


def test_a_blocked_job_gives_up_its_slot_and_queues_again_with_its_rank():
    p, _ = policy(limit=1)
    loading, other = job(0, deadline=10), job(1, deadline=20)
    p.submit(loading)
    p.submit(other)
    assert p.block(loading) == [other]  # waiting for its LoRAs: the slot goes to the next one
    assert not loading.active and loading not in p.waiting
    assert p.unblock(loading) == [] and loading in p.waiting  # ready again: queued, no slot free
    assert p.step_done(other, 0.1, level=1) == [loading]  # ranks first: other yields at its step boundary


def test_without_a_queue_the_limit_steps_back_down_for_latency():
    c, feed = AdaptiveConcurrency(window=2), Feeder()
    feed(c, 1, 1.0)
    c.adjust(queued=3)
    feed(c, 2, 2.0)  # twice as productive while there was a queue
    c.adjust(queued=3)
    assert c.limit == 3
    feed(c, 3, 2.2)
    c.adjust(queued=0)  # the queue is gone: fewer at once, each finishes sooner
    assert c.limit == 2


def test_a_probe_that_does_not_pay_is_repeated_ever_more_rarely():
    c, feed = AdaptiveConcurrency(window=2, reprobe=2, max_reprobe=8), Feeder()

    def windows_until_probe() -> int:
        n = 0
        while c.limit == 1:
            feed(c, 1, 1.0)
            c.adjust(queued=8)
            n += 1
        feed(c, 2, 1.0)  # a saturated CPU: level 2 adds nothing
        c.adjust(queued=8)
        assert c.limit == 1
        return n

    windows_until_probe()  # the first probe: level 2 unmeasured
    assert [windows_until_probe() for _ in range(4)] == [4, 8, 8, 8]


def test_a_probe_that_pays_resets_the_interval():
    c, feed = AdaptiveConcurrency(window=2, reprobe=2), Feeder()
    feed(c, 1, 1.0)
    c.adjust(queued=8)
    feed(c, 2, 1.0)
    c.adjust(queued=8)
    assert c.limit == 1 and c._reprobe_after == 4
    c.rate[2] = 2.0  # the hardware changed (or the first measurement was noise): level 2 pays
    feed(c, 1, 1.0)
    c.adjust(queued=8)
    assert c.limit == 2 and c._reprobe_after == 2


def test_deadline_estimates_use_the_step_time_measured_for_that_kind_of_step():
    p, _ = policy(limit=1)
    light, heavy = job(0, cost=1.0, steps=3), job(0, cost=4.0, steps=3)
    p.submit(light)
    p.step_done(light, 0.4, level=1)  # cost 1: 0.4 s
    p.finish(light)
    p.submit(heavy)
    p.step_done(heavy, 0.8, level=1)  # cost 4: 0.8 s, not 4 x 0.4
    assert p.concurrency.step_seconds(4.0) == pytest.approx(0.8)
    assert p.estimated_finish(heavy, now=10.0) == pytest.approx(10.0 + 2 * 0.8)
    assert p.concurrency.step_seconds(2.0) is not None  # an unseen kind: from seconds per cost unit
