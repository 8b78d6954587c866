"""LyCORIS files (LoHa, LoKr, LoCon) → dense weight deltas, as A1111's built-in Lora extension computes them.

diffusers reads plain LoRAs (``lora_down``/``lora_up``, :mod:`triton_backend.lora.convert`) but not LoHa or LoKr,
whose deltas are not a low-rank product. A file with ``hada_`` or ``lokr_`` keys is converted here instead, every
module to ``{component}:{module}.delta`` = the full ``ΔW`` with its scale (``alpha / dim``, A1111's
``NetworkModule.calc_scale``) applied; the patcher adds ``delta * LORA_SCALE`` to the weight. Formulas
(``extensions-builtin/Lora``):

* LoHa (``network_hada.py``): ``(w1_a @ w1_b) ⊙ (w2_a @ w2_b)`` (Tucker ``hada_t1``/``hada_t2``: ``make_weight_cp``);
* LoKr (``network_lokr.py``): ``kron(w1, w2)``, each factor whole (``lokr_w1``) or a product (``lokr_w1_a @
  lokr_w1_b``; ``lokr_t2``: Tucker); the scale applies only to a factored one (``dim`` is its rank);
* LoCon / LoRA modules of such a file (``network_lora.py``): ``lora_up @ lora_down`` (kxk convolutions too).

Key names are kohya's: ``lora_unet_<module with _>``, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` +
``text_model_<module>``; SDXL UNet keys in SGM naming (``input_blocks_…``) are mapped with diffusers' own
``_maybe_map_sgm_blocks_to_diffusers``.
"""

from __future__ import annotations

import torch

from ..errors import InvalidRequestError

#: kohya prefix → diffusers component.
PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
#: The suffixes of one module's tensors (what follows the module's key and a dot).
PARTS = (
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "scale",
)  # fmt: skip


def is_lycoris(keys: list[str]) -> bool:
    """A file with LoHa or LoKr modules (this converter); plain LoRA files go to diffusers' loaders."""
    return any(".hada_" in k or ".lokr_" in k for k in keys)


def make_weight_cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A1111 ``lyco_helpers.make_weight_cp``: a Tucker-decomposed convolution kernel."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def rebuild_conventional(up: torch.Tensor, down: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """A1111 ``lyco_helpers.rebuild_conventional``: ``up @ down`` reshaped."""
    return (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(shape)


def module_delta(w: dict[str, torch.Tensor], weight_shape: torch.Size) -> torch.Tensor:
    """One module's ``ΔW`` (shaped like its weight) with ``alpha / dim`` applied, A1111's ``calc_updown`` +
    ``finalize_updown`` at multiplier 1.
    """
    dim: int | None = None
    if "hada_w1_a" in w:
        w1a, w1b, w2a, w2b = w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"]
        dim = w1b.shape[0]
        shape = [w1a.size(0), w1b.size(1)]
        if "hada_t1" in w:
            shape = [w1a.size(1), w1b.size(1), *w["hada_t1"].shape[2:]]
            up1 = make_weight_cp(w["hada_t1"], w1a, w1b)
        else:
            shape += list(w1b.shape[2:]) if w1b.ndim == 4 else []
            up1 = rebuild_conventional(w1a, w1b, shape)
        up2 = make_weight_cp(w["hada_t2"], w2a, w2b) if "hada_t2" in w else rebuild_conventional(w2a, w2b, shape)
        delta = up1 * up2
    elif "lokr_w1" in w or "lokr_w1_a" in w:
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        dim = None if "lokr_w1" in w else w["lokr_w1_b"].shape[0]
        if "lokr_w2" in w:
            w2 = w["lokr_w2"]
        elif "lokr_t2" in w:
            w2 = make_weight_cp(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
        else:
            w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
        if "lokr_w2_b" in w:
            dim = w["lokr_w2_b"].shape[0]
        if w2.ndim == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        delta = torch.kron(w1, w2.contiguous())
    else:  # LoCon / LoRA
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        dim = down.shape[0]
        delta = rebuild_conventional(up, down, [up.shape[0], *down.shape[1:]]) if down.ndim == 4 else up @ down
    delta = delta.reshape(weight_shape)
    if "scale" in w:
        scale = float(w["scale"])
    elif dim is not None and "alpha" in w:
        scale = float(w["alpha"]) / dim
    else:
        scale = 1.0
    return delta * scale


def _names(component: str, model: torch.nn.Module) -> dict[str, str]:
    """Kohya module key (without its ``lora_…_`` prefix) → module name, for every module with a weight."""
    out = {}
    for name, module in model.named_modules():
        if not hasattr(module, "weight") or not name:
            continue
        key = name.replace(".", "_")
        out[key] = name
        if component != "unet" and not name.startswith("text_model."):  # transformers 5: no text_model prefix
            out["text_model_" + key] = name
    return out


def convert_lycoris(
    state_dict: dict[str, torch.Tensor], components: dict[str, torch.nn.Module], lora: str, field: str
) -> dict[str, torch.Tensor]:
    """Every module's ``{component}:{module}.delta`` (float32, CPU) of a LyCORIS file; a module the model lacks, or
    of another shape, is refused naming ``field`` and the file.
    """
    if "text_encoder_2" in components and any(k.startswith("lora_unet_input_blocks") for k in state_dict):
        from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

        state_dict = _maybe_map_sgm_blocks_to_diffusers(state_dict, components["unet"].config)
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        part = next((p for p in PARTS if key.endswith("." + p)), None)
        if prefix is None or part is None:
            raise InvalidRequestError(field, f"{lora}: unknown LyCORIS key {key!r}")
        modules.setdefault((PREFIXES[prefix], key[len(prefix) : -len(part) - 1]), {})[part] = tensor.float()
    names = {c: _names(c, m) for c, m in components.items()}
    out: dict[str, torch.Tensor] = {}
    for (component, key), weights in modules.items():
        if component not in components:
            raise InvalidRequestError(field, f"{lora}: has {component} layers (an SDXL file); this model has none")
        name = names[component].get(key)
        if name is None:
            raise InvalidRequestError(field, f"{lora}: layer {key} is not in this model's {component}")
        weight: torch.Tensor = components[component].get_submodule(name).weight  # type: ignore[assignment]
        try:
            delta = module_delta(weights, weight.shape)
        except (RuntimeError, KeyError) as exc:
            raise InvalidRequestError(
                field, f"{lora}: layer {key} does not fit this model's {tuple(weight.shape)} ({exc})"
            ) from None
        out[f"{component}:{name}.delta"] = delta.contiguous()
    if not out:
        raise InvalidRequestError(field, f"{lora}: no layer of this model matched")
    return out
