"""Every ``config.pbtxt`` parameter of every model: its type, range, default and meaning, in one table.

A model parses its parameters here once, at load (:func:`parse`): a value of the wrong type or out of range, or a
parameter the model does not have, fails the load with one line naming the model, the parameter and what is
allowed. ``swiftdiffusion serve`` and ``repository`` check ``--set`` values with the same table before anything
starts (:func:`parse`). The shipped ``config.pbtxt`` files hold these defaults (tested), and ``docs/parameters.md``
is generated from this table (``python -m triton_backend.parameters > docs/parameters.md``, tested).

The table lists each parameter once; :data:`MODELS` says which models have it, with their own default where it
differs (``num_threads`` is 1 for the stages that run beside the UNet, 0 = every core for the others).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .schema import RequestLimits

#: Values of a switch: ``auto`` is resolved by :mod:`triton_backend.plan` from the device and the layout, only there.
SWITCH = ("auto", "on", "off")
DTYPES = ("auto", "float32", "float16", "bfloat16")
#: Layouts a ``denoise`` is rendered for: ``cpu`` holds the UNet and the ControlNets in its own process; ``split``
#: calls the ``unet`` model once per step (which calls the ``controlnet`` service): the paper's split, also what
#: every GPU layout renders (:mod:`triton_backend.serving.repository`).
STAGE_LAYOUTS = ("split", "cpu")


@dataclass(frozen=True)
class Param:
    """One parameter. ``kind``: ``int`` / ``float`` (within ``minimum``..``maximum``; ``auto`` too where
    ``auto_ok``), ``choice`` (one of ``choices``), or ``text`` (any string: a path, a model name, an address).
    """

    name: str
    kind: str
    default: str
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    auto_ok: bool = False

    def allowed(self) -> str:
        """What may be written, in words (the error message and the docs)."""
        if self.kind == "choice":
            return ", ".join(self.choices)
        if self.kind == "text":
            return "text"
        kind = "an integer" if self.kind == "int" else "a number"
        low = "" if self.minimum is None else f" >= {self.minimum:g}"
        high = "" if self.maximum is None else f" <= {self.maximum:g}"
        return ("auto or " if self.auto_ok else "") + kind + (low + (" and" if low and high else "") + high)

    def parse(self, model: str, raw: str) -> Any:
        """The typed value of ``raw`` (``""`` = the default); :class:`ConfigError` names model, parameter, range."""
        value = raw.strip() if raw.strip() != "" else self.default
        if self.kind == "text":
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise self.error(model, raw)
            return value
        if self.auto_ok and value == "auto":
            return "auto"
        try:
            number: float = int(value) if self.kind == "int" else float(value)
        except ValueError:
            raise self.error(model, raw) from None
        if math.isnan(number) or (self.minimum is not None and number < self.minimum):
            raise self.error(model, raw)
        if self.maximum is not None and number > self.maximum:
            raise self.error(model, raw)
        return number

    def error(self, model: str, raw: str) -> ConfigError:
        return ConfigError(f"{model}: parameter {self.name}={raw!r}; allowed: {self.allowed()}")


def _int(name: str, default: int | str, doc: str, minimum: int | None = 0, maximum: int | None = None, **kw: Any):
    return Param(name, "int", str(default), doc, minimum, maximum, **kw)


def _mb(name: str, default: int, doc: str) -> Param:
    return Param(name, "float", str(default), doc + " MiB; 0 = off.", 0)


def _switch(name: str, doc: str) -> Param:
    return Param(name, "choice", "auto", doc, choices=SWITCH)


def _stage(role: str) -> Param:
    return Param(f"{role}_model", "text", role, f"Triton model name of the {role} stage this one calls.")


def _url(role: str) -> Param:
    return Param(f"{role}_url", "text", "", f"HOST:PORT of another server that serves {role} (empty: this one).")


PARAMS: dict[str, Param] = {
    p.name: p
    for p in (
        Param(
            "model_dir",
            "text",
            "",
            "The diffusers model directory (empty: $SWIFTDIFFUSION_MODEL_DIR, else the generated default model).",
        ),
        Param(
            "dtype",
            "choice",
            "auto",
            "Weights and compute dtype (auto: float16 on a GPU, float32 on a CPU).",
            choices=DTYPES,
        ),
        _int("num_threads", 0, "Intra-op threads on a CPU (0: the cores divided by the model's instances)."),
        _switch(
            "cpu_gate",
            "On a CPU, this stage's compute takes turns with the other stages' (a lock shared by "
            "the server's stages). auto: on for a model with one CPU instance.",
        ),
        Param(
            "layout",
            "choice",
            "split",
            "Written by the renderer. split: every UNet pass is a call to the unet "
            "model; cpu: the UNet, the ControlNets and the hint embedding run in this process.",
            choices=STAGE_LAYOUTS,
        ),
        Param(
            "load_stages",
            "choice",
            "off",
            "Load the stages this model calls over BLS when it loads (rendered "
            "fleet repositories: loading the public model brings up the pipeline).",
            choices=("on", "off"),
        ),
        Param("remote_timeout_s", "float", "60", "Seconds a call to a stage on another server may take.", 0.001),
        Param(
            "retry_window_s",
            "float",
            "25",
            "Seconds a request waits for a stage that died to come back (then "
            "its call is retried: the same image) before it fails with UNAVAILABLE naming the stage; a request "
            "with DEADLINE_MS waits until its deadline instead. 0: fail at once.",
            0,
        ),
        _switch(
            "freeze",
            "Run the UNet's passes as frozen TorchScript graphs of its two halves (bitwise the same "
            "result). auto: on for a CPU instance (not measured on a GPU yet).",
        ),
        _switch(
            "channels_last",
            "The VAE decoder's weights in channels-last order. auto: on for a CPU instance "
            "(a third faster there; the same image within float rounding).",
        ),
        _switch(
            "latent_parallel",
            "Send the two CFG branches of a step as two concurrent requests to two unet "
            "instances. auto: on when the unet model has at least two instances; on with fewer fails the "
            "load. The LATENT_PARALLEL input overrides it per request.",
        ),
        _int(
            "max_rows",
            16,
            "Rows (CFG branches of concurrent requests) the in-process UNet runs in one pass "
            "(the unet model's max_batch_size in the split layout).",
            minimum=1,
        ),
        _int("resident_capacity", 8, "ControlNets kept loaded (LRU); a miss reloads from disk.", minimum=1),
        Param("controlnet_dir", "text", "", "The ControlNet store (empty: <model_dir>/controlnets)."),
        _mb("hint_cache_mb", 256, "Hint-embedding cache: the same hint image reused across requests is embedded once."),
        Param("lora_dir", "text", "", "The LoRA store (empty: <model_dir>/loras)."),
        Param(
            "vae_dir",
            "text",
            "",
            "A replacement VAE: a diffusers AutoencoderKL directory of the same latent space (e.g. SDXL's fp16-fix "
            "VAE; empty: <model_dir>/vae).",
        ),
        Param(
            "embedding_dir",
            "text",
            "",
            "The textual-inversion embedding store (empty: <model_dir>/embeddings); a file's stem triggers it.",
        ),
        _mb("cache_budget_mb", 1024, "Converted LoRAs kept in host shared memory (LRU)."),
        Param(
            "lora_store",
            "text",
            "",
            "module:Class of the LoRA store (empty: the built-in file store, "
            "triton_backend.lora.store.LoraStore); a store for other storage subclasses it.",
        ),
        _mb(
            "prompt_cache_mb",
            64,
            "Prompt-embedding cache: a request whose prompts, guidance on/off and "
            "text-encoder LoRAs equal a recent one's skips the encoders.",
        ),
        _int(
            "lora_bound_k",
            "auto",
            "Bounded asynchronous LoRA loading: the step by which a request's LoRAs are "
            "patched in at the latest (auto: 40% of the steps; 0: before the first step). LORA_BOUND_K overrides "
            "it per request.",
            auto_ok=True,
        ),
        _int(
            "max_active",
            "auto",
            "Generations that may step at once (auto: measured, from 1 up while it adds throughput).",
            minimum=1,
            auto_ok=True,
        ),
        _int(
            "max_pending",
            64,
            "Generations held at once (stepping and waiting); beyond, UNAVAILABLE at once.",
            minimum=1,
        ),
        _int("default_deadline_ms", 0, "Deadline of a request without DEADLINE_MS, in ms after arrival (0: none)."),
        Param(
            "late_policy",
            "choice",
            "serve",
            "A request that can no longer meet its deadline: serve it after "
            "the feasible ones, or reject it when it would start.",
            choices=("serve", "reject"),
        ),
        _int("max_steps", RequestLimits.max_steps, "Largest STEPS accepted.", minimum=1),
        _int("max_height", RequestLimits.max_height, "Largest HEIGHT accepted.", minimum=8),
        _int("max_width", RequestLimits.max_width, "Largest WIDTH accepted.", minimum=8),
        _int(
            "max_hint_bytes", RequestLimits.max_hint_bytes, "Largest CONTROLNET_IMAGES accepted, in bytes.", minimum=1
        ),
        _int(
            "max_image_bytes",
            RequestLimits.max_image_bytes,
            "Largest INIT_IMAGE (and MASK_IMAGE) accepted, in bytes.",
            minimum=1,
        ),
        _int("max_images", RequestLimits.max_images, "Largest NUM_IMAGES accepted (images per request).", minimum=1),
        _int("max_prompt_chars", RequestLimits.max_prompt_chars, "Longest prompt accepted, in characters.", minimum=1),
        _int(
            "max_prompt_bytes",
            RequestLimits.max_prompt_bytes,
            "Longest prompt accepted, in UTF-8 bytes (checked before decoding).",
            minimum=1,
        ),
        *(_stage(role) for role in ("text_encoder", "denoise", "unet", "vae", "controlnet", "lora_manager")),
        *(_url(role) for role in ("text_encoder", "denoise", "unet", "vae", "controlnet", "lora_manager")),
    )
}

#: What each template model has: parameter -> its default there (``None``: the table's).
_COMMON = {"model_dir": None, "dtype": None, "num_threads": None, "cpu_gate": None}
_SCHEDULING = ("max_active", "max_pending", "default_deadline_ms", "late_policy")
_LIMITS = ("max_steps", "max_height", "max_width", "max_hint_bytes", "max_images")
_CONTROLNETS = {"resident_capacity": None, "controlnet_dir": None, "hint_cache_mb": None}
MODELS: dict[str, dict[str, str | None]] = {
    "text_encoder": {
        **_COMMON,
        "max_prompt_chars": None,
        "max_prompt_bytes": None,
        "lora_dir": None,
        "embedding_dir": None,
        "lora_manager_model": None,
        "prompt_cache_mb": None,
    },
    # The split layout's denoise: one call to the unet model per step.
    "denoise": {
        "model_dir": None,
        "num_threads": "1",
        "layout": None,
        "unet_model": None,
        "latent_parallel": None,
        "lora_bound_k": None,
        "lora_manager_model": None,
        "controlnet_model": None,
        **dict.fromkeys(_SCHEDULING),
        **dict.fromkeys(_LIMITS),
    },
    "unet": {**_COMMON, "freeze": None, "controlnet_model": None},
    "vae": {
        **_COMMON,
        "vae_dir": None,
        "channels_last": None,
        "max_height": None,
        "max_width": None,
        "max_image_bytes": None,
    },
    "controlnet": {**_COMMON, **_CONTROLNETS, "num_threads": "1"},
    "lora_manager": {
        **_COMMON,
        "lora_dir": None,
        "cache_budget_mb": None,
        "num_threads": "1",
        "dtype": "float32",
        "lora_store": None,
    },
    **{
        public: {"text_encoder_model": None, "denoise_model": None, "vae_model": None, "retry_window_s": None}
        for public in ("txt2img", "txt2img_stream", "img2img", "img2img_stream")
    },
    "baseline": {"model_dir": None, "dtype": None, "num_threads": None},
}
#: The ``cpu`` layout's denoise: the split one without the stages it no longer calls, with the UNet's and the
#: ControlNet service's parameters folded in (their processes are not rendered), on every core.
CPU_DENOISE: dict[str, str | None] = {
    **{k: v for k, v in MODELS["denoise"].items() if k not in ("unet_model", "controlnet_model", "latent_parallel")},
    **_COMMON,
    "layout": "cpu",
    "freeze": None,
    "max_rows": None,
    **_CONTROLNETS,
}
#: Parameters the renderer may add to any model that calls stages: where they are (``<role>_url``), how long a
#: remote call may take, whether to load them with this model.
RENDERED = ("load_stages", "remote_timeout_s")
#: Written by the watchdog into the config of a stage it reloads (the reload's number: a changed config makes Triton
#: create new instances); any model may carry it, nothing reads it.
RELOAD = "swiftdiffusion_reload"


def mib(value: float) -> int:
    """A budget parameter in MiB (``*_mb``) as bytes."""
    return int(value * (1 << 20))


def model_params(role: str, layout: str = "split") -> dict[str, str]:
    """Parameter -> default of the model ``role`` (a template name, or ``baseline``) in ``layout``."""
    if role not in MODELS:
        raise ConfigError(f"no parameters are known for a model of role {role!r}")
    table = CPU_DENOISE if role == "denoise" and layout == "cpu" else MODELS[role]
    out = {name: PARAMS[name].default if default is None else default for name, default in table.items()}
    if any(name.endswith("_model") for name in out):
        for name in RENDERED:
            out[name] = PARAMS[name].default
        for name in [n for n in out if n.endswith("_model")]:
            out[name.removesuffix("_model") + "_url"] = ""
    return out


def parse(model: str, role: str, raw: Mapping[str, str]) -> dict[str, Any]:
    """Every parameter of ``role`` typed from ``raw`` (config strings; absent or empty = the default). A parameter
    the model does not have, or a bad value, raises :class:`ConfigError` naming ``model`` and the parameter.
    """
    layout = PARAMS["layout"].parse(model, raw.get("layout", "")) if role == "denoise" else "split"
    defaults = model_params(role, layout)
    unknown = sorted(set(raw) - set(defaults) - {RELOAD})
    if unknown:
        raise ConfigError(
            f"{model}: no parameter {unknown[0]!r} in a {role} model"
            + (f" of layout {layout}" if role == "denoise" else "")
            + f"; it has: {', '.join(sorted(defaults))}"
        )
    return {name: PARAMS[name].parse(model, raw.get(name, "") or default) for name, default in defaults.items()}


def markdown() -> str:
    """``docs/parameters.md``: every model's parameters, defaults and allowed values, from this table."""
    lines = [
        "# Config parameters",
        "",
        "Generated from `triton_backend/parameters.py` (`python -m triton_backend.parameters > docs/parameters.md`);",
        "a test keeps it current. Each model parses its parameters once, at load: a bad value or an unknown",
        "parameter fails the load naming the model, the parameter and what is allowed, and `swiftdiffusion serve`",
        "/ `repository` check `--set MODEL.PARAMETER=VALUE` the same way before anything starts. Empty = the default.",
        "`auto` is resolved at load into the model's plan (`triton_backend/plan.py`), logged in one line.",
        "",
    ]
    roles = [
        ("denoise (layout cpu)", "denoise", "cpu") if r == "denoise@cpu" else (r, r, "split")
        for r in (
            "txt2img",
            "txt2img_stream",
            "img2img",
            "img2img_stream",
            "text_encoder",
            "denoise",
            "denoise@cpu",
            "unet",
            "vae",
            "controlnet",
            "lora_manager",
            "baseline",
        )
    ]
    for title, role, layout in roles:
        lines += [f"## `{title}`", "", "| parameter | default | allowed | meaning |", "|---|---|---|---|"]
        for name, default in model_params(role, layout).items():
            p = PARAMS[name]
            lines.append(f"| `{name}` | `{default}` | {p.allowed()} | {p.doc} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown())
