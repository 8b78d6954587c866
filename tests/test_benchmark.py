"""``scripts/benchmark.py``'s readings of a rate sweep (pure logic, no server)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("benchmark", Path(__file__).parents[1] / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)


def sweep(*points: tuple[float, float]) -> dict:
    return {f"{rate:g}": {"slo_attainment": attainment} for rate, attainment in points}


def test_throughput_at_slo_is_the_highest_rate_that_met_it():
    assert benchmark.throughput_at_slo(sweep((0.4, 0.98), (0.8, 0.88), (1.0, 0.92), (1.2, 0.5))) == 1.0
    assert benchmark.throughput_at_slo(sweep((0.4, 0.8))) == 0.0


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        (((0.4, 0.98), (0.8, 0.88), (1.0, 0.92)), 0.4 + 0.4 * 0.08 / 0.10),  # the first fall, not a later bump
        (((0.5, 0.8), (1.0, 0.5)), 0.5 * 0.1 / 0.2),  # from 100 % at rate 0
        (((0.5, 0.95), (1.0, 0.91)), 1.0),  # never below: the highest rate
        ((), 0.0),
    ],
)
def test_slo_crossing_interpolates_where_attainment_first_falls_below_the_target(points, expected):
    assert benchmark.slo_crossing(sweep(*points)) == pytest.approx(expected)
