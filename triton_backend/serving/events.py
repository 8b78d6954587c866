"""Opt-in timestamp tracing across stages (``SWIFTDIFFUSION_TRACE_FILE``): one JSON line per event.

Used by tests to show that the UNet encoder half really runs while its ControlNet requests are in flight
(timestamps recorded by the stages themselves, not sleeps). Off unless the environment variable is set.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

TRACE_ENV = "SWIFTDIFFUSION_TRACE_FILE"


def enabled() -> bool:
    return bool(os.environ.get(TRACE_ENV))


def trace(event: str, **fields: Any) -> None:
    """Append ``{"event", "t", "pid", **fields}`` to the trace file (O_APPEND: lines from processes interleave)."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields}) + "\n"
    with open(path, "a") as f:
        f.write(line)
