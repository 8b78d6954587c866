"""A stage's own process, set up by its ``model.py`` before torch, diffusers or transformers are imported.

Three things are decided at import time, so a Triton model config cannot carry them and a fleet's server does not
set them for us (DESIGN §5: fleets never set our environment variables):

- **Packages it never uses.** ``import diffusers.models.AutoencoderKL`` imports transformers, peft and scipy when
  they are installed (diffusers' quantizer and PEFT mixins, transformers' loss functions): ~90 MB in every process
  that imports a diffusers model class, though the VAE, UNet and ControlNet stages use none of them (our LoRA
  patching is our own). :func:`prepare` leaves them out of the process.
- **The compiler.** diffusers marks its hooks with ``torch.compiler.disable`` when their classes are defined, which
  imports ``torch._dynamo`` and with it sympy: another ~67 MB, in a process that never compiles. A stage that leaves
  out ``torch._dynamo`` gets a ``torch.compiler.disable`` that returns the function as it is: without a compiler,
  that is all the mark means (diffusers' own fallback for a torch without dynamo does the same for
  ``maybe_allow_in_graph``). transformers imports ``torch._dynamo`` directly, so the text encoder keeps it.
- **How long idle OpenMP threads spin.** Each stage process runs torch's intra-op (OpenMP) threads over the same
  cores. GNU OpenMP lets a thread spin 300,000 times (~ms) after each parallel region before it sleeps, so the stage
  that ran last still burns the cores when the next one starts (the CPU gate makes them take turns; see
  :mod:`triton_backend.cpu_gate`). 10,000 spins still catch the back-to-back regions of one forward pass. Measured
  interleaved on 2 cores, one request at a time: tiny preset 53.4 → 42.7 ms (the VAE decode right after the last
  UNet step 7.1 → 4.4 ms); ``cpu`` preset 442 → 438 ms (no change); ``OMP_WAIT_POLICY=PASSIVE`` (0 spins) made a
  plain request 1.5x slower. A ``GOMP_SPINCOUNT`` already in the environment wins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

#: GNU OpenMP's active-wait iterations after a parallel region in a stage process (the library's default: 300,000).
SPIN_COUNT = "10000"


def prepare(leave_out: tuple[str, ...] = ()) -> None:
    """Set up this stage process before torch loads: the OpenMP spin count, and ``leave_out`` the packages it never
    uses (with ``torch._dynamo``, ``torch.compiler.disable`` becomes :func:`no_compiler_disable`).
    """
    if "torch" in sys.modules:
        raise RuntimeError("prepare the stage process before torch is imported (its OpenMP reads the environment once)")
    for name in leave_out:
        if sys.modules.get(name) is not None:
            raise RuntimeError(f"leave out {name!r}: {name} is already imported in this process")
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
    for name in leave_out:
        # The import system's own "not importable" marker: ``import`` raises ImportError and
        # ``importlib.util.find_spec`` (how diffusers and transformers probe optional packages) returns None.
        sys.modules[name] = None  # type: ignore[assignment]
    if "torch._dynamo" in leave_out:
        import torch.compiler

        torch.compiler.disable = no_compiler_disable


def no_compiler_disable(fn: Callable | None = None, recursive: bool = True, *, reason: str | None = None) -> Any:
    """``torch.compiler.disable`` in a process without the compiler: the function itself (or, called without one, a
    decorator that returns its function).
    """
    return fn if fn is not None else (lambda f: f)
