"""Render a self-contained Triton model repository for a deployment (``swiftdiffusion repository``).

A deployment is one or more pipelines, each ``NAME=MODEL_DIR``. A pipeline's public model is named exactly
``NAME`` (the template ``txt2img``, renamed), its streaming variant ``NAME_stream``, its image-to-image models
``NAME_img2img`` and ``NAME_img2img_stream`` (a pipeline named ``txt2img`` keeps ``img2img``), and its
stages carry the name as prefix (``NAME_text_encoder``, ``NAME_denoise``, ``NAME_unet``, ``NAME_vae``,
``NAME_controlnet``, ``NAME_lora_manager``), so pipelines sit side by side with each other and with the fleet's own
models. Every parameter a stage needs is
written into its ``config.pbtxt``: the model directory, and the names of the stages it calls (ensemble steps and
``*_model`` parameters); the rendered repository depends on no environment variable of ours. The device layout
(:class:`Layout`: ``cpu``, ``split`` or a GPU layout) decides which models are rendered at all (the cpu layout
folds the UNet and the ControlNets into ``denoise``), and ``KIND_CPU``/``KIND_GPU``, GPU ids, UNet instances and
dtype per stage.

The templates are ``model_repository/`` (shipped inside the package as ``triton_backend/model_repository`` when
installed from a wheel). ``swiftdiffusion serve`` renders its repository here too, with one pipeline named
``txt2img`` and no prefix (the names the README documents), in ``--layout auto``: ``cpu`` without a GPU.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from .. import parameters
from ..errors import ConfigError
from ..model_info import ModelInfo
from ..paths import is_store_name, model_repository_dir
from . import contract

#: The templates' public model, its streaming variant (``NAME_stream``), and the stages both are built from (all
#: of them get the pipeline's prefix).
PUBLIC = "txt2img"
STREAM = "txt2img_stream"
IMG2IMG = "img2img"
IMG2IMG_STREAM = "img2img_stream"
#: The public models of a pipeline (what clients call), and the streaming ones among them.
PUBLIC_MODELS = (PUBLIC, STREAM, IMG2IMG, IMG2IMG_STREAM)
STREAMING = (STREAM, IMG2IMG_STREAM)
STAGES = ("text_encoder", "denoise", "unet", "vae", "controlnet", "lora_manager")
#: Stages pipelines of one architecture may share (``share_adapters``).
SHAREABLE = ("controlnet", "lora_manager")
#: Named GPU layouts (docs/architecture.md "Layouts"): GPUs of text_encoder, unet instances, vae, controlnet
#: (denoise and lora_manager stay on the CPU: scheduler math, LoRA conversion).
LAYOUTS: dict[str, dict[str, list[int]]] = {
    "1gpu": {"text_encoder": [0], "unet": [0], "vae": [0], "controlnet": [0]},
    "2gpu": {"text_encoder": [0], "unet": [0, 1], "vae": [1], "controlnet": [0]},
    "2gpu+1c": {"text_encoder": [0], "unet": [0, 1], "vae": [1], "controlnet": [2]},
    "2gpu+2c": {"text_encoder": [0], "unet": [0, 1], "vae": [1], "controlnet": [2, 3]},
}
#: Every layout: ``cpu`` (denoise holds the UNet, the ControlNets and the hint embedding), ``split`` (the bundled
#: repository: every stage its own model, on CPU instances), and the GPU layouts (the split on GPUs).
LAYOUT_NAMES = ("cpu", "split", *LAYOUTS)
#: Models the cpu layout does not render: their work runs in ``denoise`` (parameters folded in).
FOLDED_INTO_DENOISE = ("unet", "controlnet")


@dataclass(frozen=True)
class Pipeline:
    """One served pipeline: its public model name and its diffusers model directory."""

    name: str
    model_dir: Path

    @classmethod
    def parse(cls, spec: str) -> Pipeline:
        """``NAME=MODEL_DIR`` (the ``--pipeline`` flag)."""
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--pipeline {spec!r}: expected NAME=MODEL_DIR")
        if not is_store_name(name) or "." in name:
            raise ValueError(f"--pipeline {spec!r}: NAME may hold letters, digits, '_' and '-' only")
        model_dir = Path(path).expanduser().resolve()
        if not (model_dir / "model_index.json").is_file():
            raise ValueError(
                f"--pipeline {spec!r}: {model_dir} is not a diffusers model directory (no model_index.json)"
            )
        return cls(name, model_dir)


@dataclass(frozen=True)
class Layout:
    """Where the stages run. ``name``: one of :data:`LAYOUT_NAMES`; ``gpus`` per model stage (empty: the CPU);
    ``dtype`` of the model stages on GPUs.
    """

    name: str = "split"
    gpus: dict[str, list[int]] = field(default_factory=dict)
    dtype: str = "auto"

    @property
    def folded(self) -> bool:
        """The cpu layout: no ``unet`` or ``controlnet`` model; ``denoise`` runs their work."""
        return self.name == "cpu"

    def renders(self, template: str) -> bool:
        return not (self.folded and template in FOLDED_INTO_DENOISE)

    @classmethod
    def named(cls, name: str, dtype: str = "auto") -> Layout:
        if name not in LAYOUT_NAMES:
            raise ValueError(f"unknown layout {name!r}; choose from {', '.join(LAYOUT_NAMES)}")
        return cls(name, LAYOUTS.get(name, {}), dtype)

    @classmethod
    def auto(cls, gpus: int, dtype: str = "auto") -> Layout:
        """``serve --layout auto``: ``cpu`` without a GPU, else the GPU layout for the GPUs there are (the ControlNet
        service gets GPUs of its own from the third on).
        """
        name = {0: "cpu", 1: "1gpu", 2: "2gpu", 3: "2gpu+1c"}.get(gpus, "2gpu+2c")
        return cls.named(name, dtype)


def visible_gpus() -> int:
    """CUDA devices this process sees (``CUDA_VISIBLE_DEVICES`` applies): what ``--layout auto`` counts."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def stage_names(pipeline: str, prefix: str | None = None) -> dict[str, str]:
    """Template model name → rendered name (``prefix`` defaults to ``<pipeline>_``)."""
    prefix = f"{pipeline}_" if prefix is None else prefix
    img2img = IMG2IMG if pipeline == PUBLIC else f"{pipeline}_{IMG2IMG}"
    return {
        PUBLIC: pipeline,
        STREAM: f"{pipeline}_stream",
        IMG2IMG: img2img,
        IMG2IMG_STREAM: f"{img2img}_stream",
        **{stage: f"{prefix}{stage}" for stage in STAGES},
    }


def render(
    out: Path,
    pipelines: list[Pipeline],
    layout: Layout | None = None,
    templates: Path | None = None,
    stage_prefix: str | None = None,
    load_stages: bool = True,
    remote: dict[str, str] | None = None,
    share_adapters: bool = False,
    streaming: bool = True,
    overrides: dict[str, dict[str, str]] | None = None,
) -> Path:
    """Write the repository for ``pipelines`` under ``out`` (replacing it); returns ``out``.

    ``remote``: stages served by another server, role → ``HOST:PORT`` (e.g. ``{"controlnet": "cn:8001"}``): they
    are left out here and their callers get ``<role>_url`` (docs/operations.md "Stages on another server").
    ``share_adapters``: pipelines of one architecture share the first one's ControlNet service and LoRA manager
    (``NAME_controlnet``, ``NAME_lora_manager`` of the first pipeline of that architecture; never across
    architectures: a ControlNet or LoRA is made for one).
    ``overrides``: config parameters to set, by template model name (``{"denoise": {"lora_bound_k": "0"}}``, the
    ``--set denoise.lora_bound_k=0`` flag); a parameter the model does not have in ``layout``, or a bad value
    (:mod:`triton_backend.parameters`), is an error naming it.
    ``streaming``: render each pipeline's streaming models ``NAME_stream`` and ``NAME_img2img_stream`` (two more
    processes per pipeline).
    ``stage_prefix``: ``None`` = each pipeline's name + ``_``; ``""`` keeps the templates' names (one pipeline).
    ``load_stages``: stages load the stages they call over BLS when they load (parameter ``load_stages``), so that
    loading ``NAME`` in explicit model control brings up the whole pipeline; ``serve`` loads everything at start
    instead. Models already in ``out`` that are not ours are kept, so a fleet's repository can be rendered into.
    """
    layout = layout or Layout()
    templates = templates or model_repository_dir()
    names_seen: set[str] = set()
    if stage_prefix == "" and len(pipelines) > 1:
        raise ValueError("several pipelines need a stage prefix each")
    for role in [*(remote or {}), *(overrides or {})]:
        if not layout.renders(role):
            raise ValueError(
                f"layout {layout.name} renders no {role} model: its work runs in denoise (set denoise's parameters, "
                f"or choose --layout split or a GPU layout for a {role} of its own)"
            )
    out.mkdir(parents=True, exist_ok=True)
    owners: dict[str, dict[str, str]] = {}  # architecture → shared role → the model serving it
    for pipeline in pipelines:
        names = stage_names(pipeline.name, stage_prefix)
        clash = names_seen & set(names.values())
        if clash:
            raise ValueError(f"pipeline {pipeline.name!r}: model names used twice: {sorted(clash)}")
        names_seen |= set(names.values())
        borrowed: set[str] = set()
        if share_adapters:
            shared = owners.setdefault(ModelInfo.read(pipeline.model_dir).arch, {})
            for role in SHAREABLE:
                if role in shared:
                    names[role] = shared[role]
                    borrowed.add(role)
                else:
                    shared[role] = names[role]
        for template, name in names.items():
            if template in (remote or {}) or template in borrowed or (template in STREAMING and not streaming):
                continue
            if not layout.renders(template):
                continue
            _render_model(
                templates / template,
                out / name,
                name,
                names,
                pipeline.model_dir,
                layout,
                load_stages,
                remote or {},
                (overrides or {}).get(template, {}),
            )
    return out


def _render_model(
    src: Path,
    dest: Path,
    name: str,
    names: dict[str, str],
    model_dir: Path,
    layout: Layout,
    load_stages: bool,
    remote: dict[str, str],
    overrides: dict[str, str],
) -> None:
    template = src.name
    text = contract.refresh((src / "config.pbtxt").read_text(), template)
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    config.name = name
    if template == "denoise":
        config.parameters["layout"].string_value = "cpu" if layout.folded else "split"
    if template == "denoise" and layout.folded:
        _fold_into_denoise(config)
    for key, value in overrides.items():
        if key not in config.parameters:
            raise ValueError(f"--set {template}.{key}: {template} has no parameter {key!r} in layout {layout.name}")
        config.parameters[key].string_value = value
    try:  # (a bad --set value fails here, by name, before any server starts)
        parameters.parse(name, template, {k: v.string_value for k, v in config.parameters.items()})
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    for step in config.ensemble_scheduling.step:
        step.model_name = names[step.model_name]
    if any(key.endswith("_model") for key in config.parameters):
        config.parameters["load_stages"].string_value = "on" if load_stages else "off"
    for role, url in remote.items():  # this stage calls that role on another server
        if f"{role}_model" in config.parameters:
            config.parameters[f"{role}_url"].string_value = url
    for key, value in config.parameters.items():
        if key == "model_dir":
            value.string_value = str(model_dir)
        elif key.endswith("_model") and value.string_value:
            value.string_value = names[value.string_value]
        elif key == "dtype" and layout.gpus:
            value.string_value = layout.dtype
    gpus = layout.gpus.get(template)
    if gpus:
        del config.instance_group[:]
        if template == "unet":  # one instance per GPU listed (latent parallelism where there are two)
            group = config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_GPU, count=1)
            group.gpus.extend(gpus)
        else:  # the stage on the first GPU listed for it (ControlNet: one instance per GPU listed)
            count = len(gpus) if template == "controlnet" else 1
            group = config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_GPU, count=1)
            group.gpus.extend(gpus if count > 1 else gpus[:1])
        if template == "controlnet" and layout.dtype in ("auto", "float16"):
            for output in config.output:
                if output.name == "RESIDUALS":
                    output.data_type = model_config_pb2.TYPE_FP16
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "config.pbtxt"))
    (dest / "1").mkdir(exist_ok=True)  # an ensemble's empty version directory (a wheel ships no empty directory)
    header = f"# Rendered by `swiftdiffusion repository` from {template}; edit the deployment, not this file.\n"
    (dest / "config.pbtxt").write_text(header + text_format.MessageToString(config))


def _fold_into_denoise(config: model_config_pb2.ModelConfig) -> None:
    """The cpu layout's ``denoise``: it calls no ``unet`` or ``controlnet`` model, and takes their parameters at
    the defaults of :data:`triton_backend.parameters.CPU_DENOISE` (every core: it runs the UNet).
    """
    folded = parameters.model_params("denoise", "cpu")
    for key in list(config.parameters):
        if key not in folded:
            del config.parameters[key]
    for key in ("num_threads", *(k for k in folded if k not in config.parameters)):
        if not key.endswith("_url") and key not in parameters.RENDERED:
            config.parameters[key].string_value = folded[key]


def parse_overrides(specs: list[str]) -> dict[str, dict[str, str]]:
    """``["denoise.lora_bound_k=0", ...]`` (the ``--set`` flags) → ``{"denoise": {"lora_bound_k": "0"}}``."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs:
        target, sep, value = spec.partition("=")
        model, dot, key = target.partition(".")
        if not (sep and dot and model and key):
            raise ValueError(f"--set {spec!r}: expected MODEL.PARAMETER=VALUE, e.g. denoise.lora_bound_k=0")
        if model not in (*PUBLIC_MODELS, *STAGES):
            raise ValueError(f"--set {spec!r}: MODEL is one of {', '.join((*PUBLIC_MODELS, *STAGES))}")
        out.setdefault(model, {})[key] = value
    return out


def pipeline_models(pipeline: str, prefix: str | None = None) -> list[str]:
    """Every model of a pipeline, public models first: the order to unload it in (new requests are refused at once,
    then the stages go). Unloading the public models alone leaves the stages their stages loaded over BLS.
    """
    names = stage_names(pipeline, prefix)
    return [*(names[m] for m in PUBLIC_MODELS), *(names[s] for s in STAGES)]


def rendered_names(repository: Path) -> dict[str, str]:
    """``{model name: template}`` of a rendered repository (from each config's header line)."""
    out = {}
    for config in sorted(repository.glob("*/config.pbtxt")):
        match = re.match(r"# Rendered by `swiftdiffusion repository` from (\w+);", config.read_text())
        if match:
            out[config.parent.name] = match.group(1)
    return out
