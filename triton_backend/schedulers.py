"""Sampler names → diffusers schedulers: the one table, used by the server, the client and the tests.

Torch-free at import (the client validates names with it); diffusers is imported when a scheduler is built.

Each name is a diffusers scheduler class plus the config it overrides, built ``from_config`` of the model's own
scheduler (so ``beta_schedule``, ``prediction_type``, ``timestep_spacing``... stay the model's). ``default`` is the
model directory's scheduler, as ``StableDiffusionPipeline`` uses it. A ``_karras`` name sets
``use_karras_sigmas=True`` (Karras et al. noise levels); a ``_trailing`` name ``timestep_spacing="trailing"``
(A1111's and ComfyUI's "SGM Uniform": what few-step models such as SDXL-Turbo and SDXL-Lightning are sampled with).
``lcm`` and ``tcd`` are the few-step samplers of LCM and TCD models and LoRAs (their guidance scale is ~1). The
A1111 and ComfyUI spellings are accepted: :func:`canonical_scheduler` lowercases, turns ``++`` into ``pp`` and any
run of spaces, ``-``, ``:``, ``,`` or ``+`` into ``_``, then looks the result up in :data:`ALIASES` (so
``"DPM++ 2M Karras"``, ``"Euler a"`` and ComfyUI's sampler + scheduler pair ``"dpmpp_2m karras"`` all name
``dpmpp_2m_karras``; ComfyUI's scheduler ``sgm_uniform`` names the ``_trailing`` entry).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequestError


@dataclass(frozen=True)
class Sampler:
    """A diffusers scheduler class (by name) and the config values it overrides."""

    cls: str | None
    config: dict[str, Any] = field(default_factory=dict)
    #: The optional package it needs (``pip install 'swiftdiffusion[samplers]'``), if any.
    needs: str | None = None


def _with(suffix: str, config: dict[str, Any], table: dict[str, Sampler], names: tuple[str, ...]) -> dict[str, Sampler]:
    """``table`` plus ``<name><suffix>`` for each of ``names``: the same sampler with ``config`` set too."""
    out = dict(table)
    for name in names:
        base = table[name]
        out[f"{name}{suffix}"] = Sampler(base.cls, {**base.config, **config}, base.needs)
    return out


def _with_karras(table: dict[str, Sampler], names: tuple[str, ...]) -> dict[str, Sampler]:
    return _with("_karras", {"use_karras_sigmas": True}, table, names)


SAMPLERS: dict[str, Sampler] = _with_karras(
    {
        "default": Sampler(None),
        "euler": Sampler("EulerDiscreteScheduler"),
        "euler_a": Sampler("EulerAncestralDiscreteScheduler"),
        "heun": Sampler("HeunDiscreteScheduler"),
        "dpm2": Sampler("KDPM2DiscreteScheduler"),
        "dpm2_a": Sampler("KDPM2AncestralDiscreteScheduler"),
        "lms": Sampler("LMSDiscreteScheduler", needs="scipy"),
        "ddim": Sampler("DDIMScheduler"),
        "pndm": Sampler("PNDMScheduler"),
        "dpmpp_2m": Sampler("DPMSolverMultistepScheduler"),
        "dpmpp_2m_sde": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
        "dpmpp_sde": Sampler("DPMSolverSDEScheduler", needs="torchsde"),
        "dpmpp_2s": Sampler("DPMSolverSinglestepScheduler"),
        "unipc": Sampler("UniPCMultistepScheduler"),
        "deis": Sampler("DEISMultistepScheduler"),
    },
    ("euler", "heun", "dpm2", "dpm2_a", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "dpmpp_2s", "unipc", "deis"),
)
SAMPLERS = _with(
    "_trailing", {"timestep_spacing": "trailing"}, SAMPLERS, ("euler", "euler_a", "dpmpp_2m", "dpmpp_sde", "ddim")
)
SAMPLERS |= {"lcm": Sampler("LCMScheduler"), "tcd": Sampler("TCDScheduler")}

#: Every accepted name, canonical first, in table order (the ``SCHEDULER`` field's valid values).
SCHEDULER_NAMES = tuple(SAMPLERS)

#: Other spellings (after :func:`_normalize`, without a ``_karras`` suffix) → table name: A1111's and ComfyUI's.
ALIASES: dict[str, str] = {
    "euler_ancestral": "euler_a",
    "k_euler": "euler",
    "k_euler_a": "euler_a",
    "dpm_2": "dpm2",
    "dpm_2_ancestral": "dpm2_a",
    "dpm2_ancestral": "dpm2_a",
    "k_lms": "lms",
    "plms": "pndm",
    "uni_pc": "unipc",
    "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
    "dpmpp_sde_gpu": "dpmpp_sde",
    "dpm_multistep": "dpmpp_2m",
    "dpm_singlestep": "dpmpp_2s",
}
#: ComfyUI's scheduler ``normal`` is the table's plain entry, ``karras`` its ``_karras`` entry, ``sgm_uniform``
#: (A1111's "SGM Uniform") its ``_trailing`` entry.
_NORMAL, _KARRAS, _TRAILING = "_normal", "_karras", "_trailing"


def _normalize(name: str) -> str:
    text = name.strip().lower().replace("++", "pp")
    return re.sub(r"[\s\-:,+]+", "_", text).strip("_")


def canonical_scheduler(name: str) -> str:
    """The table name of ``name`` (a table name or an alias); an unknown name raises, listing the accepted ones."""
    key = _normalize(name).removesuffix(_NORMAL).replace("_sgm_uniform", _TRAILING)
    suffix = next((s for s in (_KARRAS, _TRAILING) if key.endswith(s)), "")
    key = ALIASES.get(key.removesuffix(suffix), key.removesuffix(suffix)) + suffix
    if key not in SAMPLERS:
        raise InvalidRequestError(
            "SCHEDULER",
            f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULER_NAMES)} (A1111/ComfyUI spellings such as "
            f"'DPM++ 2M Karras', 'Euler a' or 'dpmpp_2m karras' are accepted too)",
        )
    return key


def _missing_package(sampler: Sampler) -> str | None:
    """The optional package ``sampler`` needs and this environment lacks, if any."""
    needs = sampler.needs
    return needs if needs is not None and importlib.util.find_spec(needs) is None else None


def is_available(name: str) -> bool:
    """Whether the optional package the sampler needs (if any) is installed."""
    return _missing_package(SAMPLERS[canonical_scheduler(name)]) is None


def make_scheduler(name: str, base: Any, seed: int | None = None) -> Any:
    """A fresh scheduler instance per request (schedulers keep step state), built ``from_config(base)``.

    ``base`` is the model's scheduler or its config. ``seed`` seeds the Brownian tree of ``dpmpp_sde`` (diffusers
    would draw its seed from torch's global generator, so the image would differ from run to run): the request's
    seed, as A1111 does.
    """
    import diffusers

    config = dict(base if isinstance(base, dict) else base.config)
    sampler = SAMPLERS[canonical_scheduler(name)]
    missing = _missing_package(sampler)
    if missing is not None:
        raise InvalidRequestError(
            "SCHEDULER",
            f"{name!r} needs the package {missing}, which this server lacks; install it with "
            "pip install 'swiftdiffusion[samplers]'",
        )
    cls = getattr(diffusers, sampler.cls or config["_class_name"])
    overrides = dict(sampler.config)
    if sampler.cls == "DPMSolverSDEScheduler" and seed is not None:
        overrides["noise_sampler_seed"] = seed
    return cls.from_config(config, **overrides)
