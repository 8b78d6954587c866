"""What one model instance will do, resolved once at load into a frozen :class:`Plan` and logged in one line.

Every deployment choice that depends on the device or the layout is decided here and nowhere else: the dtype,
the threads, the CPU gate, where the UNet and the ControlNets run, frozen UNet graphs, the channels-last VAE,
latent parallelism. A switch written ``auto`` takes the rule below; an explicit ``on`` that cannot hold fails the
load and says why; nothing is dropped silently.

The layout itself is the renderer's choice (:mod:`triton_backend.serving.repository`): it writes ``layout`` into
``denoise``'s config and renders only the models that layout runs. ``cpu``: ``denoise`` runs the UNet, the
ControlNets and the hint embedding in its own process (no ``unet`` or ``controlnet`` model). ``split``: ``denoise``
calls ``unet`` once per step, ``unet`` calls the ``controlnet`` service (the bundled repository, and every GPU
layout).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: Where a technique runs, as the plan line shows it.
IN_PROCESS = "in-process"


@dataclass(frozen=True)
class Plan:
    """The resolved choices of one model instance (fields that do not apply to its role keep their defaults and
    are left out of :meth:`line`).
    """

    model: str
    role: str
    device: str
    dtype: str
    threads: int
    cpu_gate: bool
    layout: str = ""
    #: ``denoise``: :data:`IN_PROCESS`, or the Triton model it calls once per step (``@URL`` when remote).
    unet: str = ""
    #: ``denoise`` (cpu layout) and ``unet``: :data:`IN_PROCESS`, or the ControlNet service model it calls.
    controlnets: str = ""
    latent_parallel: bool = False
    freeze: bool = False
    channels_last: bool = False

    @property
    def unet_in_process(self) -> bool:
        return self.unet == IN_PROCESS

    def line(self) -> str:
        """``plan denoise: layout=cpu device=cpu dtype=float32 threads=2 cpu_gate=on unet=in-process ...``."""
        parts = [f"layout={self.layout}"] if self.layout else []
        parts += [f"device={self.device}", f"dtype={self.dtype}", f"threads={self.threads}"]
        parts.append(f"cpu_gate={_onoff(self.cpu_gate)}")
        if self.unet:
            parts.append(f"unet={self.unet}")
        if self.controlnets:
            parts.append(f"controlnets={self.controlnets}")
        if self.role == "denoise" and not self.unet_in_process:
            parts.append(f"latent_parallel={_onoff(self.latent_parallel)}")
        if self.role == "unet" or (self.role == "denoise" and self.unet_in_process):
            parts.append(f"freeze={_onoff(self.freeze)}")
        if self.role == "vae":
            parts.append(f"channels_last={_onoff(self.channels_last)}")
        return f"plan {self.model}: " + " ".join(parts)


def _onoff(value: bool) -> str:
    return "on" if value else "off"


def _switch(model: str, params: dict[str, Any], name: str, auto: bool, refusal: str = "") -> bool:
    """A switch parameter as a bool: ``auto`` = the rule's ``auto``; ``on`` where ``refusal`` says why it cannot
    hold fails the load.
    """
    value = params.get(name, "auto")
    if value == "on" and refusal:
        raise ConfigError(f"{model}: parameter {name}=on, but {refusal}")
    return auto if value == "auto" else value == "on"


def resolve(
    model: str,
    role: str,
    params: dict[str, Any],
    device: Any,
    instance_count: int = 1,
    repository: Path | None = None,
) -> Plan:
    """The plan of ``model`` (its ``role``, typed ``params`` from :func:`triton_backend.parameters.parse`) for an
    instance on ``device`` (a ``torch.device``) among ``instance_count``; ``repository`` is where ``denoise`` reads
    how many instances the ``unet`` it calls has.
    """
    cpu = device.type == "cpu"
    dtype = params.get("dtype", "auto")
    if dtype == "auto":
        dtype = "float32" if cpu else "float16"
    threads = int(params.get("num_threads", 0)) or max(1, (os.cpu_count() or 1) // max(1, instance_count))
    gate_refusal = "" if cpu else f"this instance runs on {device}, and the gate takes turns on CPU cores"
    plan: dict[str, Any] = dict(
        model=model,
        role=role,
        device=str(device),
        dtype=dtype,
        threads=threads,
        cpu_gate=_switch(model, params, "cpu_gate", auto=cpu and instance_count == 1, refusal=gate_refusal),
    )
    if role == "denoise":
        plan["layout"] = params["layout"]
        if params["layout"] == "cpu":
            plan.update(unet=IN_PROCESS, controlnets=IN_PROCESS, freeze=_switch(model, params, "freeze", auto=cpu))
        else:
            plan.update(_split_denoise(model, params, repository))
    elif role == "unet":
        plan["controlnets"] = _called(params, "controlnet")
        plan["freeze"] = _switch(model, params, "freeze", auto=cpu)
    elif role == "vae":
        plan["channels_last"] = _switch(model, params, "channels_last", auto=cpu)
    return Plan(**plan)


def _called(params: dict[str, Any], role: str) -> str:
    """The model a stage calls for ``role``, with ``@URL`` when it is on another server."""
    url = params.get(f"{role}_url", "")
    return params[f"{role}_model"] + (f"@{url}" if url else "")


def _split_denoise(model: str, params: dict[str, Any], repository: Path | None) -> dict[str, Any]:
    """The split layout's ``denoise``: the unet it calls per step, and latent parallelism (``auto`` = on when that
    unet has at least two instances to run the two CFG branches on).
    """
    from .config import instance_count, read_model_config

    unet = params["unet_model"]
    instances = None  # (unknown for a unet on another server, or outside a repository: tests)
    config = repository / unet / "config.pbtxt" if repository is not None else None
    if not params.get("unet_url") and config is not None and config.is_file():
        instances = instance_count(read_model_config(config))
    refusal = ""
    if instances is not None and instances < 2:
        refusal = f"the unet model {unet!r} has {instances} instance: the two branches need two"
    parallel = _switch(model, params, "latent_parallel", auto=(instances or 0) >= 2, refusal=refusal)
    return dict(unet=_called(params, "unet"), controlnets=_called(params, "controlnet"), latent_parallel=parallel)
