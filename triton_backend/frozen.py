"""TorchScript-frozen UNet passes (parameter ``freeze``): a forward pass without diffusers' per-module Python.

A small UNet on a CPU spends a good part of each pass in Python: module calls, hooks, attention processor dispatch,
shape arithmetic. ``torch.jit.trace`` records the aten operations of one pass and ``torch.jit.freeze`` inlines the
parameters as constants, so a pass runs in TorchScript's interpreter. It runs the same operations on the same
weights: the outputs are bitwise equal to the eager module's (tested). The frozen constants share the parameters'
storage, so weights patched in place (LoRAs, :class:`~triton_backend.lora.patch.WeightPatcher`) apply to the graph
too (tested).

A trace records shapes as values, not constants (tested at other batch sizes, latent sizes and prompt lengths);
Python branches are baked in, so a caller uses a graph only where the branches it took hold (see
:class:`~triton_backend.controlnet.unet_split.FrozenHalves`).

Each trace keeps tens of MB of torch's tracer state for the life of the process, also after its graph is freed
(measured: ~25 MB for each half of the cpu preset's UNet, the same again for every further trace). So a process
traces a model it never evicts, once: ControlNets, loaded and evicted by an LRU, run eagerly (frozen, their passes
were 18-26 % shorter, but every reload would keep another trace, and the cpu preset's server went from 1.66 to
2.15 GB PSS with six ControlNets frozen in two processes).

Build a graph on the thread that will run it: tracing runs the model, which starts that thread's OpenMP team, and
passes on a second thread would run at half speed (see :class:`~triton_backend.stages.unet.LocalSteps`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from .model_info import ModelInfo


def frozen_graph(module: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    """``module`` traced on ``example`` and frozen, its first (slow) runs done here rather than in a request."""
    with torch.no_grad(), warnings.catch_warnings():
        # (the trace warns at every Python branch on a shape; see the module docstring)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        graph = torch.jit.freeze(torch.jit.trace(module.eval(), example, check_trace=False))
        with interpreted():
            for _ in range(2):
                graph(*example)
    return graph


def example_step(info: ModelInfo, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The inputs of a guided step (2 rows) at the model's native size, to trace a UNet with:
    ``(sample, timestep, encoder_hidden_states[, text_embeds, time_ids])`` (SDXL: the added conditioning).
    """
    side = info.native_size // info.vae_scale_factor
    step = (
        torch.zeros(2, info.unet_in_channels, side, side, device=device, dtype=dtype),
        torch.full((2,), 500.0, device=device),
        torch.zeros(2, 77, info.cross_attention_dim, device=device, dtype=dtype),
    )
    if not info.is_sdxl:
        return step
    added = (torch.zeros(2, info.pooled_dim, device=device, dtype=dtype), torch.zeros(2, 6, device=device, dtype=dtype))
    return (*step, *added)


@contextlib.contextmanager
def interpreted() -> Iterator[None]:
    """Run graphs as traced: no profiling runs and re-specialisation per new shape (the same speed here)."""
    with torch.jit.optimized_execution(False):
        yield
