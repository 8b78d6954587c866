"""The ``input``/``output`` blocks of the models that carry the request, written from :data:`schema.FIELDS`.

``txt2img``, ``img2img``, their streaming variants, ``text_encoder``, ``denoise``, ``vae`` and the baseline's
``txt2img`` take the request's fields; their config blocks are generated here, so adding a field to the
request is one edit in ``triton_backend/schema.py`` plus its use. The renderer applies :func:`refresh` to every
template it renders; the checked-in configs are kept refreshed too (a test), with
``python -m triton_backend.serving.contract`` after a schema change.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ..schema import DENOISE_INPUTS, FIELDS, FIELDS_BY_NAME, IMG2IMG_ONLY, TEXT_ENCODER_INPUTS, VAE_ENCODE_INPUTS

#: schema dtype -> config ``data_type``.
TYPES = {"BYTES": "TYPE_STRING", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "FP32": "TYPE_FP32",
         "UINT8": "TYPE_UINT8", "BOOL": "TYPE_BOOL"}  # fmt: skip

#: (name, dtype, dims, optional)
Tensor = tuple[str, str, tuple[int, ...], bool]


def _fields(names: tuple[str, ...] | None = None) -> list[Tensor]:
    """Request fields as config inputs, all optional: a missing ``PROMPT`` gets our error naming it (``INVALID_ARG``)
    from the stage that reads it, the same from every public model and stage. ``None``: ``img2img``'s (all).
    """
    specs = FIELDS if names is None else [FIELDS_BY_NAME[n] for n in names]
    return [(f.name, f.triton_dtype, f.dims, True) for f in specs]


#: ``txt2img``'s fields: all but the images to start from.
TXT2IMG_FIELDS = tuple(f.name for f in FIELDS if f.name not in IMG2IMG_ONLY)
IMAGE: Tensor = ("IMAGE", "UINT8", (-1, -1, 3), False)
IMAGES: Tensor = ("IMAGES", "UINT8", (-1, -1, -1, 3), False)
#: ``vae``'s encoding of ``img2img``'s images (the latent distributions, the mask at the latent size).
MOMENTS: list[Tensor] = [
    ("INIT_MOMENTS", "FP32", (-1, -1, -1, -1), True),
    ("MASKED_MOMENTS", "FP32", (-1, -1, -1, -1), True),
    ("LATENT_MASK", "FP32", (-1, -1, -1, -1), True),
]
STREAM_OUTPUTS: list[Tensor] = [
    ("STEP", "INT32", (1,), False),
    ("TOTAL_STEPS", "INT32", (1,), False),
    ("PREVIEW", "UINT8", (-1, -1, 3), False),
    IMAGE,
    IMAGES,
]
LANDED: Tensor = ("LORA_LANDED_STEP", "INT32", (1,), False)
PREVIEW_EVERY: Tensor = ("PREVIEW_EVERY", "INT32", (1,), True)
PROMPT_EMBEDS: Tensor = ("PROMPT_EMBEDS", "FP32", (-1, -1, -1), False)
POOLED_EMBEDS: Tensor = ("POOLED_EMBEDS", "FP32", (-1, -1), False)
LATENTS: Tensor = ("LATENTS", "FP32", (-1, -1, -1, -1), False)

#: Template (``model_repository/<name>``, ``baseline`` = ``baseline_repository/txt2img``) -> (inputs, outputs).
MODELS: dict[str, tuple[list[Tensor], list[Tensor]]] = {
    "txt2img": (_fields(TXT2IMG_FIELDS), [IMAGE, IMAGES, LANDED]),
    "img2img": (_fields(), [IMAGE, IMAGES, LANDED]),
    "baseline": (_fields(), [IMAGE, IMAGES, LANDED]),
    "txt2img_stream": ([*_fields(TXT2IMG_FIELDS), PREVIEW_EVERY], [*STREAM_OUTPUTS, LANDED]),
    "img2img_stream": ([*_fields(), PREVIEW_EVERY], [*STREAM_OUTPUTS, LANDED]),
    "text_encoder": (_fields(TEXT_ENCODER_INPUTS), [PROMPT_EMBEDS, POOLED_EMBEDS]),
    "denoise": (
        [
            PROMPT_EMBEDS,
            (*POOLED_EMBEDS[:3], True),
            *_fields(DENOISE_INPUTS),
            *MOMENTS,
            ("LATENT_PARALLEL", "BOOL", (1,), True),
            ("PROGRESS_ADDRESS", "BYTES", (1,), True),
            ("PROGRESS_STEPS", "BOOL", (1,), True),
            PREVIEW_EVERY,
        ],
        [LATENTS, LANDED],
    ),
    "vae": (
        [(*LATENTS[:3], True), *_fields(VAE_ENCODE_INPUTS)],
        [IMAGES, *((n, t, d, False) for n, t, d, _ in MOMENTS)],
    ),
}


def _tensor_line(tensor: Tensor) -> str:
    name, dtype, dims, optional = tensor
    text = f'  {{ name: "{name}" data_type: {TYPES[dtype]} dims: [ {", ".join(map(str, dims))} ]'
    return text + (" optional: true }" if optional else " }")


def _block(kind: str, tensors: list[Tensor]) -> str:
    return f"{kind} [\n" + ",\n".join(_tensor_line(t) for t in tensors) + "\n]\n"


def _replace(text: str, pattern: str, block: str, what: str) -> str:
    new, n = re.subn(pattern, lambda _: block, text, count=1, flags=re.MULTILINE | re.DOTALL)
    if n != 1:
        raise ValueError(f"the config has no {what} block to write")
    return new


def refresh(text: str, template: str) -> str:
    """``text`` (a ``config.pbtxt``) with the contract's blocks of ``template`` written in; other text unchanged."""
    if template not in MODELS:
        return text
    inputs, outputs = MODELS[template]
    text = _replace(text, r"^input \[\n.*?^\]\n", _block("input", inputs), "input")
    text = _replace(text, r"^output \[\n.*?^\]\n", _block("output", outputs), "output")
    return text


def checked_in(root: Path) -> dict[str, Path]:
    """Template -> its checked-in config under the project ``root``."""
    out = {name: root / "model_repository" / name / "config.pbtxt" for name in MODELS if name != "baseline"}
    return {**out, "baseline": root / "baseline_repository" / "txt2img" / "config.pbtxt"}


def main() -> int:
    """Rewrite the checked-in configs' contract blocks (after a change to ``schema.py``)."""
    root = Path(__file__).resolve().parents[2]
    for template, path in checked_in(root).items():
        text = path.read_text()
        if refresh(text, template) != text:
            path.write_text(refresh(text, template))
            sys.stdout.write(f"rewrote {path.relative_to(root)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
