"""What a stage process imports: diffusers and transformers import some packages whenever they are installed.

``import diffusers.models.AutoencoderKL`` imports transformers, peft and scipy when they are installed (diffusers'
quantizer and PEFT mixins, transformers' loss functions), ~90 MB of every process that imports a diffusers model
class, though the VAE, UNet and ControlNet stages use none of them (our LoRA patching is our own). A stage's
``model.py`` calls :func:`leave_out` first, so its process never imports them.
"""

from __future__ import annotations

import sys


def leave_out(*packages: str) -> None:
    """Make this process behave as if ``packages`` were not installed: ``import`` raises ``ImportError`` and
    ``importlib.util.find_spec`` (how diffusers and transformers probe optional packages) returns ``None``.

    Call it before anything imports diffusers or transformers; a package already imported is a mistake in the caller.
    Only for a stage's own process (its ``model.py``), never in a process that runs other code.
    """
    for name in packages:
        if sys.modules.get(name) is not None:
            raise RuntimeError(f"leave_out({name!r}): {name} is already imported in this process")
        sys.modules[name] = None  # type: ignore[assignment]  # the import system's own "not importable" marker
