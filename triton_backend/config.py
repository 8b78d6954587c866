"""Typed stage configuration, parsed once from Triton's ``args`` in ``initialize``.

Every ``model.py`` builds a :class:`StageConfig` from ``args``; a missing or bad parameter raises
:class:`~triton_backend.errors.ConfigError`, which fails the model load and names the parameter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .paths import MODEL_DIR_ENV, default_model_dir
from .schema import RequestLimits

if TYPE_CHECKING:
    import torch

    from .plan import Plan


def disable_tf32() -> None:
    """fp32 matmuls and convolutions in full fp32 on CUDA (also for references: ``tests/conftest.py``)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


@dataclass(frozen=True)
class StageConfig:
    """What one Triton model instance needs to know: its typed parameters and its :class:`~triton_backend.plan.Plan`,
    resolved from ``config.pbtxt`` and the instance.
    """

    model_name: str
    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    plan: Plan
    limits: RequestLimits = field(default_factory=RequestLimits)
    #: Names of other stages this one calls over BLS (``unet_model`` → ``"unet"``).
    stages: dict[str, str] = field(default_factory=dict)
    #: Every parameter of the model, typed (:mod:`triton_backend.parameters`; absent ones at their default).
    params: dict[str, Any] = field(default_factory=dict)
    #: The model repository this stage was loaded from (Triton's ``args["model_repository"]`` is the model's dir).
    repository: Path | None = None

    @property
    def num_threads(self) -> int:
        return self.plan.threads

    @classmethod
    def from_triton_args(cls, args: dict[str, Any], role: str) -> StageConfig:
        """Parse Triton's ``initialize`` args (``model_config`` JSON, instance kind and device id) as a ``role``
        model (its template name).
        """
        config = json.loads(args["model_config"])
        repo = args.get("model_repository")
        return cls.from_params(
            config.get("name", "?"),
            triton_params(config),
            kind=args.get("model_instance_kind", "CPU"),
            device_id=int(args.get("model_instance_device_id", 0) or 0),
            instance_count=instance_count(config),
            role=role,
            repository=Path(repo).parent if repo else None,
        )

    @classmethod
    def from_params(
        cls,
        model_name: str,
        params: dict[str, str],
        kind: str = "CPU",
        device_id: int = 0,
        instance_count: int = 1,
        role: str | None = None,
        repository: Path | None = None,
    ) -> StageConfig:
        """Build from plain string parameters (what ``config.pbtxt`` holds; ``role`` defaults to ``model_name``);
        used directly by tests.
        """
        import torch  # (here, not at the top: processes that run no model import this module without torch)

        from . import parameters, plan

        values = parameters.parse(model_name, role or model_name, params)
        if kind == "GPU":
            if not torch.cuda.is_available():
                raise ConfigError(f"{model_name}: instance_group KIND_GPU but CUDA is not available")
            device = torch.device(f"cuda:{device_id}")
        else:
            device = torch.device("cpu")
        resolved = plan.resolve(model_name, role or model_name, values, device, instance_count, repository)
        limits = RequestLimits(
            **{f.name: values[f.name] for f in dataclasses.fields(RequestLimits) if f.name in values}
        )
        return cls(
            model_name,
            resolve_model_dir(values.get("model_dir", "")),
            device,
            getattr(torch, resolved.dtype),
            resolved,
            limits,
            called_stages(values),
            values,
            repository,
        )

    def apply_torch_settings(self) -> None:
        """Process-wide torch settings of this instance's stub.

        CPU: intra-op threads (CPU instances share the machine's cores). CUDA in float32: TF32 off, so fp32 means
        fp32 (Ampere and later run fp32 convolutions in TF32 by default; results would drift from diffusers' fp32).
        """
        import torch

        if self.device.type == "cpu":
            torch.set_num_threads(self.num_threads)
        elif self.device.type == "cuda" and self.dtype == torch.float32:
            disable_tf32()

    def compute(self) -> contextlib.AbstractContextManager:
        """Around one piece of compute (never around a wait for another stage): the CPU gate when ``cpu_gate``."""
        from .cpu_gate import cpu_gate

        return cpu_gate().hold() if self.plan.cpu_gate else contextlib.nullcontext()

    def stage(self, role: str) -> str:
        """Triton model name of the stage with ``role`` (config parameter ``{role}_model``), default ``role``."""
        return self.stages.get(role, role)


def triton_params(model_config: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` of a model config (Triton's ``model_config`` JSON) as plain strings."""
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def called_stages(params: dict[str, Any]) -> dict[str, str]:
    """Role → Triton model name of the stages a model calls over BLS: its ``<role>_model`` parameters."""
    return {k[: -len("_model")]: v for k, v in params.items() if k.endswith("_model") and v}


def resolve_model_dir(value: str) -> Path:
    """``model_dir`` parameter → ``$SWIFTDIFFUSION_MODEL_DIR`` → the generated default model; must exist."""
    raw = value or os.environ.get(MODEL_DIR_ENV, "") or str(default_model_dir())
    path = Path(os.path.expanduser(raw))
    if not (path / "model_index.json").is_file() and not (path / "unet" / "config.json").is_file():
        raise ConfigError(
            f"model_dir={str(path)!r} is not a diffusers model directory (no model_index.json); set the model_dir "
            f"parameter or ${MODEL_DIR_ENV}, or run `swiftdiffusion default-model --out DIR`"
        )
    return path


def read_model_config(config_pbtxt: Path) -> dict[str, Any]:
    """A ``config.pbtxt`` as Triton's ``model_config`` JSON (protobuf field names; fields at their default left out),
    parsed with tritonclient's definitions: what a stage reads of a stage it calls (``denoise`` of ``unet``).
    """
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    try:
        text = config_pbtxt.read_text()
    except OSError:
        raise ConfigError(f"cannot read {config_pbtxt}") from None
    try:
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"{config_pbtxt}: {exc}") from None
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def instance_count(config: dict[str, Any]) -> int:
    """Instances (stub processes) a model config asks for: ``count`` per GPU listed (or once), summed over its
    ``instance_group`` entries (1 when none is given).
    """
    groups = config.get("instance_group") or [{}]
    return sum(int(g.get("count", 1)) * max(1, len(g.get("gpus", []))) for g in groups)
