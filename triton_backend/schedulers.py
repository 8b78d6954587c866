"""Scheduler name → diffusers scheduler class: the one table, used by the server, client and tests."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .errors import InvalidRequestError
from .schema import SCHEDULER_NAMES

#: ``"default"`` means the scheduler saved in the model directory, as ``StableDiffusionPipeline`` uses it. The
#: torch-free schema (used by the client) lists the same names as ``SCHEDULER_NAMES`` (tests/test_schedulers.py).
SCHEDULERS: dict[str, type[SchedulerMixin] | None] = {
    "default": None,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
}


def check_scheduler_name(name: str) -> str:
    """Return ``name`` if it is a known scheduler, else raise naming the field and the valid names."""
    if name not in SCHEDULERS:
        raise InvalidRequestError("SCHEDULER", f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULER_NAMES)}")
    return name


def make_scheduler(name: str, base: SchedulerMixin | dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler instance per request (schedulers keep step state), built ``from_config(base)``."""
    config = base if isinstance(base, dict) else base.config
    cls = SCHEDULERS[check_scheduler_name(name)]
    if cls is None:
        import diffusers

        cls = getattr(diffusers, config["_class_name"])
    return cls.from_config(config)
