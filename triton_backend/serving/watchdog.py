"""Stage crash recovery: reload a model whose Python stub process died.

The bundled 2.51 Python backend never restarts a dead stub (an OOM kill, a segfault in a native library): it answers
every later request of that instance with "Stub process '<instance>' is not healthy" while the model still reports
ready (DESIGN.md §5). The watchdog runs beside ``tritonserver`` (in ``TritonServer``, so in ``swiftdiffusion serve``
and the tests): every ``interval`` it counts each model's live stub processes (children of the server, by the
``model.py`` they run; zombies count as dead) and, when one has fewer than after start, reloads that model through
the model-control API (the server runs with ``--model-control-mode=explicit``). Requests that were in flight on the
dead stub fail with ``UNAVAILABLE`` naming the stage; the next ones are served by the new instances.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def stub_processes(server_pid: int) -> dict[str, list[int]]:
    """Live Python stub processes of ``server_pid`` by model name (Linux ``/proc``; zombies are left out)."""
    out: dict[str, list[int]] = {}
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children")
    if not children.exists():
        return out
    for pid in (int(p) for p in children.read_text().split()):
        with contextlib.suppress(OSError):
            if "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text():
                continue
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            model_py = next((Path(a.decode()) for a in args if a.endswith(b"model.py")), None)
            if model_py is not None:
                out.setdefault(model_py.parent.parent.name, []).append(pid)
    return out


@dataclass
class Reload:
    """One recovery: which model, when its stub was found dead, how long the reload took, and how it ended."""

    model: str
    detected_at: float
    seconds: float
    error: str = ""


@dataclass
class StageWatchdog:
    """Watches the stubs of one server and reloads a model whose stub died (see the module docstring)."""

    server_pid: int
    grpc_url: str
    interval: float = 1.0
    log: Callable[[str], None] = logging.getLogger("swiftdiffusion.watchdog").warning
    reloads: list[Reload] = field(default_factory=list)
    _expected: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> StageWatchdog:
        """Record each model's stub count now (the server is ready) and start watching."""
        self._expected = {model: len(pids) for model, pids in stub_processes(self.server_pid).items()}
        self._thread = threading.Thread(target=self._run, name="stage-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def dead(self) -> list[str]:
        """Models with fewer live stubs than at start."""
        live = stub_processes(self.server_pid)
        return [m for m, n in self._expected.items() if len(live.get(m, ())) < n]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for model in self.dead():
                if self._stop.is_set():
                    return
                self.reload(model)

    def reload(self, model: str) -> Reload:
        """Reload ``model`` (new stub processes); wait until it is ready again."""
        import tritonclient.grpc as grpcclient

        start = time.monotonic()
        self.log(f"watchdog: a stub process of '{model}' died; reloading it")
        error = ""
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            # A load of an unchanged, loaded model is a no-op: its own config with one parameter changed (this
            # reload's number) makes Triton create new instances, then retire the old ones.
            config = client.get_model_config(model, as_json=True)["config"]
            config.setdefault("parameters", {})["swiftdiffusion_reload"] = {"string_value": str(len(self.reloads) + 1)}
            client.load_model(model, config=json.dumps(config))
        except Exception as exc:  # noqa: BLE001 - reported, retried at the next interval
            error = f"{type(exc).__name__}: {exc}"
        finally:
            client.close()
        event = Reload(model, start, time.monotonic() - start, error)
        self.reloads.append(event)
        self.log(
            f"watchdog: '{model}' " + (f"reload failed: {error}" if error else f"reloaded in {event.seconds:.1f}s")
        )
        return event
