"""The ControlNet wire format, one place for sender and receiver.

Three messages cross process boundaries:

* ``denoise`` → ``controlnet`` *prepare*: ``CONTROLNET_NAME [1, 1]``, ``HINT_IMAGE [1, H, W, 3]`` → ``HINT_FILE [1, 1]``
  (:func:`prepare_tensors`, parsed into a :class:`HintPrepare`);
* ``denoise`` → ``unet``: a step's ControlNets as ``CONTROLNETS [b, 1]`` (:func:`encode_controlnets`,
  :func:`decode_controlnets`), one :class:`ControlRef` each;
* ``unet`` → ``controlnet`` *step*: the step's tensors plus ``CONTROLNET_NAME``, ``HINT_FILE``, ``SCALE`` per row
  (:func:`step_request_tensors`, parsed into a :class:`~triton_backend.controlnet.service.ControlRow`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..errors import InvalidRequestError
from ..schema import decode_json_rows, encode_json_rows, parse_names
from .service import ControlRow

#: Input tensors of the ``controlnet`` model (both kinds of request).
INPUTS = (
    "CONTROLNET_NAME",
    "HINT_IMAGE",
    "HINT_FILE",
    "SCALE",
    "SAMPLE",
    "TIMESTEP",
    "ENCODER_HIDDEN_STATES",
    "TEXT_EMBEDS",
    "TIME_IDS",
)
#: What a *step* request must carry besides ``CONTROLNET_NAME``.
STEP_REQUIRED = ("HINT_FILE", "SCALE", "SAMPLE", "TIMESTEP", "ENCODER_HIDDEN_STATES")


class ControlRef(NamedTuple):
    """One ControlNet of one step: its name, this request's hint-embedding file and its effective scale."""

    name: str
    hint_file: str
    scale: float


@dataclass(frozen=True)
class HintPrepare:
    """A *prepare* request: embed ``images [b, H, W, 3]`` (uint8) with the ControlNets ``names`` (one per image)."""

    names: tuple[str, ...]
    images: np.ndarray


def prepare_tensors(name: str, image: np.ndarray) -> dict[str, np.ndarray]:
    """The *prepare* request for one hint image ``[H, W, 3]``."""
    return {"CONTROLNET_NAME": np.array([[name.encode()]], dtype=np.object_), "HINT_IMAGE": image[None]}


def hint_file(outputs: Mapping[str, np.ndarray]) -> str:
    """The ``HINT_FILE`` of a *prepare* response."""
    return bytes(outputs["HINT_FILE"].reshape(-1)[0]).decode()


def hint_files_tensor(files: Sequence[str]) -> np.ndarray:
    """``HINT_FILE [b, 1]`` of a *prepare* response."""
    return np.array([[f.encode()] for f in files], dtype=np.object_)


def step_request_tensors(step_tensors: dict[str, np.ndarray], ref: ControlRef) -> dict[str, np.ndarray]:
    """The *step* request of one ControlNet: the UNet step's tensors (``[rows, ...]``) plus its name, hint, scale."""
    rows = step_tensors["SAMPLE"].shape[0]
    return {
        **step_tensors,
        "CONTROLNET_NAME": np.array([[ref.name.encode()]] * rows, dtype=np.object_),
        "HINT_FILE": np.array([[ref.hint_file.encode()]] * rows, dtype=np.object_),
        "SCALE": np.full((rows, 1), ref.scale, dtype=np.float32),
    }


def parse_request(tensors: dict[str, np.ndarray]) -> HintPrepare | ControlRow:
    """One ``controlnet`` request → a :class:`HintPrepare` (``HINT_IMAGE`` present) or a step's :class:`ControlRow`."""
    if "CONTROLNET_NAME" not in tensors:
        raise InvalidRequestError("CONTROLNET_NAME", "is required")
    names = parse_names(tensors, "CONTROLNET_NAME")
    if "HINT_IMAGE" in tensors:
        return HintPrepare(names, tensors["HINT_IMAGE"])
    unique = set(names)
    missing = [k for k in STEP_REQUIRED if k not in tensors]
    if missing or len(unique) != 1:
        raise InvalidRequestError(
            missing[0] if missing else "CONTROLNET_NAME",
            "step requests need one ControlNet and HINT_FILE, SCALE, SAMPLE, TIMESTEP, ENCODER_HIDDEN_STATES",
        )
    hints = set(parse_names(tensors, "HINT_FILE"))
    tensor = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items() if v.dtype != np.object_}
    return ControlRow(
        unique.pop(),
        hints.pop(),
        sample=tensor["SAMPLE"],
        timestep=tensor["TIMESTEP"],
        encoder_hidden_states=tensor["ENCODER_HIDDEN_STATES"],
        scale=tensor["SCALE"],
        text_embeds=tensor.get("TEXT_EMBEDS"),
        time_ids=tensor.get("TIME_IDS"),
    )


def encode_controlnets(refs: Sequence[ControlRef], rows: int) -> np.ndarray:
    """``CONTROLNETS [rows, 1]``: a step's ControlNets (``unet`` sends each of them a *step* request)."""
    return encode_json_rows(refs, rows)


def decode_controlnets(value: np.ndarray) -> tuple[ControlRef, ...]:
    """Inverse of :func:`encode_controlnets`."""
    return tuple(ControlRef(*t) for t in decode_json_rows(value, "CONTROLNETS"))
