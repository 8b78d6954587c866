"""What every Triton model class of ours does at load and unload, without torch: the stub's ``pb_utils``, the
model config and its parameters, the stages it calls (over BLS, or gRPC for a stage on another server) and its BLS
client. :class:`~triton_backend.serving.models.StageModel` adds a stage's model; ``txt2img_stream``, which runs no
model, are this shell alone (:mod:`triton_backend.serving.public`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from .. import parameters
from ..config import called_stages, triton_params
from .io import BlsClient, RemoteStage


def in_triton_stub() -> bool:
    """Whether this process is a Triton Python-backend stub (never a test or a tool that drives a model class)."""
    with contextlib.suppress(OSError):
        return Path(os.readlink("/proc/self/exe")).name == "triton_python_backend_stub"
    return False


def exit_now() -> None:
    """End the stub process as soon as the interpreter starts to finalize (registered in ``finalize``).

    By then the stub has answered the server's finalize message and freed its shared memory; what is left of the
    interpreter's shutdown (module teardown, torch's static destructors) took ~3 s per stage on 2 cores, and the
    server waits for every stub to exit before it does. Output is flushed first.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


class ModelShell:
    """Load: ``pb_utils``, the model config, the stages called (loaded first where ``load_stages`` says so), one
    BLS client per instance. Unload: the client stops and the stub exits without the interpreter's slow teardown.
    """

    #: The template this model is rendered from (``model_repository/<role>``): which parameters it has.
    role = ""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.logger = pb_utils.Logger
        #: Triton's model config (JSON), e.g. for the data types of the outputs.
        self.model_config = json.loads(args["model_config"])
        self.model_name = str(self.model_config.get("name", "?"))
        #: The model's parameters, typed (:mod:`triton_backend.parameters`; a bad one fails the load).
        self.params = parameters.parse(self.model_name, self.role, triton_params(self.model_config))
        #: Role → model name of the stages this one calls (its ``*_model`` parameters).
        self.stages = called_stages(self.params)
        remotes = self.remote_stages()
        self.load_called_stages(skip=set(remotes))
        #: This instance's BLS client: its own event loop and executor.
        self.bls = BlsClient(pb_utils, name=self.model_name, remotes=remotes)

    def called(self, role: str) -> str:
        """Triton model name of the stage with ``role`` (config parameter ``{role}_model``), default ``role``."""
        return self.stages.get(role, role)

    def remote_stages(self) -> dict[str, RemoteStage]:
        """Stages this one calls on another Triton server: parameter ``<role>_url`` (``HOST:PORT``) next to
        ``<role>_model``; each is checked at load (a clear error if it cannot be reached).
        """
        out = {}
        for role, name in self.stages.items():
            url = self.params.get(f"{role}_url", "")
            if url:
                out[name] = RemoteStage(url, self.params["remote_timeout_s"])
                out[name].check(name)
        return out

    def load_called_stages(self, skip: set[str]) -> None:
        """With parameter ``load_stages: "on"`` (repositories rendered for a fleet): load the stages this one calls
        over BLS (its ``*_model`` parameters) unless they are ready, through the Python backend's model-loading
        API. Triton loads an ensemble's steps with it but knows nothing of BLS targets, so this is what makes
        loading a pipeline's public model bring up the whole pipeline in ``--model-control-mode=explicit``.
        """
        if self.params.get("load_stages") != "on":
            return
        for name in self.stages.values():
            if name not in skip and not self.pb.is_model_ready(model_name=name):
                self.pb.load_model(model_name=name)

    def finalize(self) -> None:
        self.bls.close()
        if in_triton_stub():
            atexit.register(exit_now)
