"""Stage ``text_encoder``: prompt strings → CLIP hidden states, as ``StableDiffusionPipeline.encode_prompt``."""

from __future__ import annotations

import numpy as np
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from .components import load_part
from .config import StageConfig
from .schema import GenerationRequest, parse_request

#: The request fields this stage consumes (the ensemble maps these ``txt2img`` inputs onto it).
INPUTS = ("PROMPT", "NEGATIVE_PROMPT", "GUIDANCE_SCALE")


class TextEncoder:
    """Tokenize (pad to 77, truncate like diffusers) and encode; one instance per Triton model instance."""

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg
        self.tokenizer = CLIPTokenizer.from_pretrained(str(cfg.model_dir / "tokenizer"))
        self.model = load_part(CLIPTextModel, cfg.model_dir, "text_encoder", cfg.device, cfg.dtype)
        self.use_attention_mask = bool(getattr(self.model.config, "use_attention_mask", False))

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

    def encode_request(self, request: GenerationRequest) -> np.ndarray:
        """``PROMPT_EMBEDS``: ``[2, 77, D]`` = (unconditional, conditional) with CFG, else ``[1, 77, D]``.

        The negative prompt defaults to ``""`` exactly as diffusers' ``encode_prompt`` does.
        """
        if request.do_classifier_free_guidance:
            texts = [request.negative_prompt or "", request.prompt]
        else:
            texts = [request.prompt]
        return self.encode(texts).numpy()

    def handle(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Triton entry: ``PROMPT``, ``NEGATIVE_PROMPT``, ``GUIDANCE_SCALE`` → ``PROMPT_EMBEDS``."""
        request = parse_request(tensors, self.cfg.limits, only=INPUTS)
        return {"PROMPT_EMBEDS": self.encode_request(request)}
