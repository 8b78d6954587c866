"""Stage ``text_encoder``: prompt strings → CLIP hidden states, as ``StableDiffusionPipeline.encode_prompt``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from .components import load_part
from .config import StageConfig
from .lora.patch import AdapterRef, WeightPatcher
from .lora.store import has_text_encoder_layers, resolve_lora_path
from .paths import lora_dir
from .schema import GenerationRequest, parse_request

#: The request fields this stage consumes (the ensemble maps these ``txt2img`` inputs onto it).
INPUTS = ("PROMPT", "NEGATIVE_PROMPT", "GUIDANCE_SCALE", "LORA_NAMES", "LORA_SCALES")

#: Blocking LoRA load: ``[(name, scale), ...] -> adapters`` (a BLS call to ``lora_manager`` in Triton).
LoadLorasSync = Callable[[list[tuple[str, float]]], Sequence[AdapterRef]]


class TextEncoder:
    """Tokenize (pad to 77, truncate like diffusers) and encode; one instance per Triton model instance."""

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg
        self.tokenizer = CLIPTokenizer.from_pretrained(str(cfg.model_dir / "tokenizer"))
        self.model = load_part(CLIPTextModel, cfg.model_dir, "text_encoder", cfg.device, cfg.dtype)
        self.use_attention_mask = bool(getattr(self.model.config, "use_attention_mask", False))
        self.patcher = WeightPatcher(self.model, "text_encoder")
        self.lora_dir = lora_dir(cfg.params, cfg.model_dir)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """``texts`` → ``[len(texts), 77, hidden]`` float32 (diffusers' ``prompt_embeds``)."""
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.cfg.device) if self.use_attention_mask else None
        hidden = self.model(tokens.input_ids.to(self.cfg.device), attention_mask=mask)[0]
        return hidden.float().cpu()

    def encode_request(self, request: GenerationRequest, adapters: Sequence[AdapterRef] = ()) -> np.ndarray:
        """``PROMPT_EMBEDS``: ``[2, 77, D]`` = (unconditional, conditional) with CFG, else ``[1, 77, D]``.

        The negative prompt defaults to ``""`` exactly as diffusers' ``encode_prompt`` does. Text-encoder LoRA
        layers of ``adapters`` are patched in for this encode and restored right after (also on failure).
        """
        if request.do_classifier_free_guidance:
            texts = [request.negative_prompt or "", request.prompt]
        else:
            texts = [request.prompt]
        try:
            self.patcher.ensure(tuple(adapters))
            return self.encode(texts).numpy()
        finally:
            self.patcher.restore()

    def needs_loras(self, request: GenerationRequest) -> bool:
        """Whether any requested LoRA has text-encoder layers (read from the file header, no conversion).

        Trade-off: the prompt embedding is computed once, before step 0, so text-encoder LoRA layers cannot land
        late; such LoRAs make this stage wait for the load (their load is on the critical path). UNet-only
        LoRAs never wait here.
        """
        return any(has_text_encoder_layers(resolve_lora_path(self.lora_dir, name)) for name in request.lora_names)

    def handle(self, tensors: dict[str, np.ndarray], load_loras: LoadLorasSync | None = None) -> dict[str, np.ndarray]:
        """Triton entry: ``PROMPT``, ``NEGATIVE_PROMPT``, ``GUIDANCE_SCALE``, LoRAs → ``PROMPT_EMBEDS``."""
        request = parse_request(tensors, self.cfg.limits, only=INPUTS)
        adapters: Sequence[AdapterRef] = ()
        if request.lora_names and load_loras is not None and self.needs_loras(request):
            adapters = load_loras(request.loras)
        return {"PROMPT_EMBEDS": self.encode_request(request, adapters)}
