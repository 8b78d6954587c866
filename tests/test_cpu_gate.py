"""``cpu_gate``: stage processes take turns to compute on a CPU (pure logic and real processes, no server)."""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
import signal
import time

import pytest

from triton_backend.config import StageConfig
from triton_backend.cpu_gate import CpuGate
from triton_backend.errors import ConfigError
from triton_backend.serving.models import freeze_loaded_objects


def _hold_and_record(path: str, seconds: float, queue) -> None:
    with CpuGate(path).hold():
        start = time.monotonic()
        time.sleep(seconds)
        queue.put((start, time.monotonic()))


def _hold_forever(path: str, ready) -> None:
    with CpuGate(path).hold():
        ready.set()
        time.sleep(60)


def test_processes_take_turns(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_hold_and_record, args=(str(tmp_path / "cpu.lock"), 0.3, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    spans = sorted(queue.get(timeout=5) for _ in procs)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 0.01, spans  # no two held the gate at once


def test_the_gate_of_a_killed_holder_is_free_at_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_forever, args=(str(tmp_path / "cpu.lock"), ready))
    holder.start()
    assert ready.wait(30)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    start = time.monotonic()
    with CpuGate(tmp_path / "cpu.lock").hold():
        assert time.monotonic() - start < 2


def test_nested_holds_release_at_the_outermost(tmp_path):
    gate = CpuGate(tmp_path / "cpu.lock")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with gate.hold():
        with gate.hold():  # e.g. a ControlNet loaded inside a step: no deadlock
            pass
        other = ctx.Process(target=_hold_and_record, args=(str(tmp_path / "cpu.lock"), 0.0, queue))
        other.start()
        time.sleep(1.0)
        still_held_until = time.monotonic()
    other.join(30)
    start, _ = queue.get(timeout=5)
    assert start >= still_held_until - 0.01  # the inner exit did not let the other process in


def test_cpu_gate_parameter(model_dir):
    params = {"model_dir": str(model_dir)}
    assert StageConfig.from_params("unet", params).plan.cpu_gate  # auto: on for a CPU instance
    assert not StageConfig.from_params("unet", {**params, "cpu_gate": "off"}).plan.cpu_gate
    assert not StageConfig.from_params("unet", params, instance_count=2).plan.cpu_gate  # two share the cores
    assert StageConfig.from_params("unet", {**params, "cpu_gate": "on"}, instance_count=2).plan.cpu_gate
    with pytest.raises(ConfigError, match="cpu_gate"):
        StageConfig.from_params("unet", {**params, "cpu_gate": "sometimes"})


def test_loaded_objects_are_frozen_out_of_the_collector():
    try:
        freeze_loaded_objects()
        assert gc.get_freeze_count() > 10_000  # torch, diffusers and the test modules
    finally:
        gc.unfreeze()
