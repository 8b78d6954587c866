"""Stage crash recovery: reload a model whose Python stub process died.

The bundled 2.51 Python backend never restarts a dead stub (an OOM kill, a segfault in a native library): it answers
every later request of that instance with "Stub process '<instance>' is not healthy" while the model still reports
ready (docs/operations.md). The watchdog runs beside ``tritonserver`` (in ``TritonServer``, so in
``swiftdiffusion serve`` and the tests): every ``interval`` it counts each model's live stub processes (children of
the server, by the ``model.py`` they run; zombies count as dead) and, when a model Triton reports ``READY`` has
fewer than its ``instance_group`` asks for, reloads that model through the model-control API (the server runs with
``--model-control-mode=explicit``). Requests that were in flight on the dead stub fail with ``UNAVAILABLE`` naming
the stage; the next ones are served by the new instances. A model an operator unloaded is not ``READY``, so it is
left alone; one loaded later is watched from then on.
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
from typing import Any

from ..config import instance_count
from ..parameters import RELOAD


def is_running(pid: int) -> bool:
    """Whether ``pid`` is alive and not a zombie (Linux ``/proc``)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def stub_processes(server_pid: int) -> dict[str, list[int]]:
    """Live Python stub processes of ``server_pid`` by model name (Linux ``/proc``; zombies are left out)."""
    out: dict[str, list[int]] = {}
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children")
    if not children.exists():
        return out
    for pid in (int(p) for p in children.read_text().split()):
        if not is_running(pid):
            continue
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            model_py = next((Path(a.decode()) for a in args if a.endswith(b"model.py")), None)
            if model_py is not None:
                out.setdefault(model_py.parent.parent.name, []).append(pid)
    return out


def model_calls(config: dict[str, Any]) -> set[str]:
    """The models a config says it calls: ensemble steps, and BLS targets (``*_model`` parameters)."""
    calls = {step["model_name"] for step in config.get("ensemble_scheduling", {}).get("step", [])}
    for key, value in config.get("parameters", {}).items():
        if key.endswith("_model") and value.get("string_value"):
            calls.add(value["string_value"])
    return calls


def ready_models(client: Any, headers: dict[str, str] | None = None) -> list[str]:
    """The models the server reports ``READY`` (one entry per model, whatever its versions).

    ``headers``: the admin key of a server whose repository API is restricted (``TritonServer.admin_headers``).
    """
    index = client.get_model_repository_index(headers=headers).models
    return sorted({m.name for m in index if m.state == "READY"})


def public_models(client: Any, headers: dict[str, str] | None = None) -> list[str]:
    """The ready models that no other ready model calls (what clients call: ``txt2img``, ``baseline``...)."""
    ready = ready_models(client, headers)
    called: set[str] = set()
    for name in ready:
        called |= model_calls(client.get_model_config(name, as_json=True)["config"])
    return [m for m in ready if m not in called]


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
    #: A new gRPC client of the server (``TritonServer.client``: TLS as the server has it).
    connect: Callable[[], Any]
    #: Headers for the restricted repository API (``TritonServer.admin_headers``).
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    interval: float = 1.0
    log: Callable[[str], None] = logging.getLogger("swiftdiffusion.watchdog").warning
    reloads: list[Reload] = field(default_factory=list)
    #: Stub processes each model's config asks for, read once per model (a reload keeps its instance groups).
    _expected: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> StageWatchdog:
        """Start watching (the server is ready)."""
        self._thread = threading.Thread(target=self._run, name="stage-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def dead(self, client: Any) -> list[str]:
        """Python models Triton reports ``READY`` with fewer live stubs than their config asks for."""
        live = stub_processes(self.server_pid)
        out = []
        for model in ready_models(client, self.headers):
            if model not in self._expected:
                config = client.get_model_config(model, as_json=True)["config"]
                self._expected[model] = instance_count(config) if config.get("backend") == "python" else 0
            if len(live.get(model, ())) < self._expected[model]:
                out.append(model)
        return out

    def _run(self) -> None:
        client = self.connect()
        try:
            while not self._stop.wait(self.interval):
                try:
                    dead = self.dead(client)
                except Exception:  # noqa: BLE001 - the server is starting, stopping or busy: look again next time
                    continue
                for model in dead:
                    if self._stop.is_set():
                        return
                    self.reload(model)
        finally:
            client.close()

    def reload(self, model: str) -> Reload:
        """Reload ``model`` (new stub processes); wait until it is ready again."""
        start = time.monotonic()
        self.log(f"watchdog: a stub process of '{model}' died; reloading it")
        error = ""
        client = self.connect()
        try:
            # A load of an unchanged, loaded model is a no-op: its own config with one parameter changed (this
            # reload's number) makes Triton create new instances, then retire the old ones.
            config = client.get_model_config(model, as_json=True)["config"]
            config.setdefault("parameters", {})[RELOAD] = {"string_value": str(len(self.reloads) + 1)}
            client.load_model(model, config=json.dumps(config), headers=self.headers)
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
