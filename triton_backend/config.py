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

#: Parameter ``dtype`` values besides ``auto`` (torch dtype names).
DTYPES = ("float32", "float16", "bfloat16")


def disable_tf32() -> None:
    """fp32 matmuls and convolutions in full fp32 on CUDA (also for references: ``tests/conftest.py``)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


@dataclass(frozen=True)
class StageConfig:
    """What one Triton model instance needs to know, resolved from ``config.pbtxt`` and the instance."""

    model_name: str
    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    num_threads: int
    limits: RequestLimits = field(default_factory=RequestLimits)
    #: Names of other stages this one calls over BLS (``unet_model`` → ``"unet"``).
    stages: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    #: The model repository this stage was loaded from (Triton's ``args["model_repository"]`` is the model's dir).
    repository: Path | None = None
    #: Parameter ``cpu_gate`` (auto = on for the single CPU instance of a model; instances configured to share the
    #: cores, e.g. two latent-parallel UNets, run side by side): compute takes turns with the other stages
    #: (:mod:`triton_backend.cpu_gate`).
    cpu_gate: bool = False

    @classmethod
    def from_triton_args(cls, args: dict[str, Any]) -> StageConfig:
        """Parse Triton's ``initialize`` args: ``model_config`` JSON, instance kind and device id."""
        config = json.loads(args["model_config"])
        params = triton_params(config)
        kind = args.get("model_instance_kind", "CPU")
        device_id = int(args.get("model_instance_device_id", 0) or 0)
        instance_count = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
        cfg = cls.from_params(
            config.get("name", "?"), params, kind=kind, device_id=device_id, instance_count=instance_count
        )
        repo = args.get("model_repository")
        return dataclasses.replace(cfg, repository=Path(repo).parent) if repo else cfg

    @classmethod
    def from_params(
        cls, model_name: str, params: dict[str, str], kind: str = "CPU", device_id: int = 0, instance_count: int = 1
    ) -> StageConfig:
        """Build from plain string parameters (what ``config.pbtxt`` holds); used directly by tests."""
        import torch  # (here, not at the top: processes that run no model import this module without torch)

        if kind == "GPU":
            if not torch.cuda.is_available():
                raise ConfigError(f"{model_name}: instance_group KIND_GPU but CUDA is not available")
            device = torch.device(f"cuda:{device_id}")
        else:
            device = torch.device("cpu")

        dtype_name = params.get("dtype", "auto") or "auto"
        if dtype_name == "auto":
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        elif dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
        else:
            raise ConfigError(f"{model_name}: parameter dtype={dtype_name!r}; allowed: auto, {', '.join(DTYPES)}")

        model_dir = resolve_model_dir(params.get("model_dir", ""))
        threads = int_param(model_name, params, "num_threads", 0)
        if threads <= 0:
            threads = max(1, (os.cpu_count() or 1) // max(1, instance_count))
        limits = RequestLimits(
            max_steps=int_param(model_name, params, "max_steps", RequestLimits.max_steps, minimum=1),
            max_height=int_param(model_name, params, "max_height", RequestLimits.max_height, minimum=8),
            max_width=int_param(model_name, params, "max_width", RequestLimits.max_width, minimum=8),
            max_prompt_chars=int_param(
                model_name, params, "max_prompt_chars", RequestLimits.max_prompt_chars, minimum=1
            ),
            max_prompt_bytes=int_param(
                model_name, params, "max_prompt_bytes", RequestLimits.max_prompt_bytes, minimum=1
            ),
            max_hint_bytes=int_param(model_name, params, "max_hint_bytes", RequestLimits.max_hint_bytes, minimum=1),
        )
        stages = called_stages(params)
        return cls(
            model_name,
            model_dir,
            device,
            dtype,
            threads,
            limits,
            stages,
            dict(params),
            cpu_gate=switch_on(model_name, params, "cpu_gate", auto=device.type == "cpu" and instance_count == 1),
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

        return cpu_gate().hold() if self.cpu_gate else contextlib.nullcontext()

    def stage(self, role: str) -> str:
        """Triton model name of the stage with ``role`` (config parameter ``{role}_model``), default ``role``."""
        return self.stages.get(role, role)


def triton_params(model_config: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` of a model config (Triton's ``model_config`` JSON) as plain strings."""
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def called_stages(params: dict[str, str]) -> dict[str, str]:
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


def int_param(model: str, params: dict[str, str], name: str, default: int, minimum: int | None = None) -> int:
    raw = params.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{model}: parameter {name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{model}: parameter {name}={value} must be >= {minimum}")
    return value


def switch_param(model: str, params: dict[str, str], name: str) -> str:
    """``auto`` (also when empty), ``on`` or ``off``: the stage resolves ``auto`` from its device and layout;
    anything else fails the load naming the parameter.
    """
    value = params.get(name, "") or "auto"
    if value not in ("auto", "on", "off"):
        raise ConfigError(f"{model}: parameter {name}={value!r}; allowed: auto, on, off")
    return value


def switch_on(model: str, params: dict[str, str], name: str, auto: bool) -> bool:
    """A :func:`switch_param` as a bool: ``on``, ``off``, or ``auto`` = the stage's own rule for its device and
    layout (``auto``).
    """
    value = switch_param(model, params, name)
    return auto if value == "auto" else value == "on"


def float_param(model: str, params: dict[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    """A number parameter (``default`` when empty); not a number or below ``minimum`` fails the load naming it."""
    raw = params.get(name, "")
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{model}: parameter {name}={raw!r} is not a number") from None
    if not value >= minimum:  # also refuses nan
        raise ConfigError(f"{model}: parameter {name}={value} must be >= {minimum:g}")
    return value


def budget_param(model: str, params: dict[str, str], name: str, default_mb: float) -> int:
    """A cache budget in MiB (``0`` disables the cache), as bytes."""
    return int(float_param(model, params, name, default_mb) * (1 << 20))


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
