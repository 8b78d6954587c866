"""Stage ``text_encoder``: prompts → CLIP hidden states (+ SDXL pooled embeddings), as diffusers' ``encode_prompt``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..cache import ByteLRU
from ..config import StageConfig
from ..errors import ConfigError, InvalidRequestError
from ..lora.patch import AdapterRef, WeightPatcher, adapter_key
from ..lora.store import has_text_encoder_layers, resolve_lora_path
from ..model_info import ModelInfo, load_part
from ..parameters import mib
from ..paths import lora_dir
from ..schema import TEXT_ENCODER_INPUTS, GenerationRequest, parse_request, reject_sdxl_only

#: The request fields this stage consumes.
INPUTS = TEXT_ENCODER_INPUTS

#: Text encoders by diffusers component name (SD has the first only).
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")

#: Blocking LoRA load: ``[(name, scale), ...] -> adapters`` (a BLS call to ``lora_manager`` in Triton).
LoadLorasSync = Callable[[list[tuple[str, float]]], Sequence[AdapterRef]]


class TextEncoder:
    """Tokenize (pad to 77, truncate like diffusers) and encode; one instance per Triton model instance.

    SD 1.x/2.x: one ``CLIPTextModel``, its last hidden state (``StableDiffusionPipeline.encode_prompt``).
    SDXL: ``CLIPTextModel`` and ``CLIPTextModelWithProjection``, each with its own tokenizer; the penultimate hidden
    states of both are concatenated and the second one's projected pooled output is ``POOLED_EMBEDS``
    (``StableDiffusionXLPipeline.encode_prompt``, ``prompt_2`` = ``prompt``).
    """

    def __init__(self, cfg: StageConfig):
        # (here, not at the top: every stage process imports this module)
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.cfg = cfg
        self.info = ModelInfo.read(cfg.model_dir)
        self.tokenizers = [CLIPTokenizer.from_pretrained(str(cfg.model_dir / "tokenizer"))]
        self.models = [load_part(CLIPTextModel, cfg.model_dir, "text_encoder", cfg.device, cfg.dtype)]
        if self.info.is_sdxl:
            self.tokenizers.append(CLIPTokenizer.from_pretrained(str(cfg.model_dir / "tokenizer_2")))
            self.models.append(
                load_part(CLIPTextModelWithProjection, cfg.model_dir, "text_encoder_2", cfg.device, cfg.dtype)
            )
        self.use_attention_mask = bool(getattr(self.models[0].config, "use_attention_mask", False))
        #: One patcher per encoder; LoRA factors are keyed ``text_encoder:…`` / ``text_encoder_2:…``.
        self.patchers = [WeightPatcher(m, c) for m, c in zip(self.models, TEXT_COMPONENTS, strict=False)]
        self.lora_dir = lora_dir(cfg.params, cfg.model_dir)
        #: Prompt embeddings of recent requests (parameter ``prompt_cache_mb``, 0 = off); see :meth:`cache_key`.
        self.cache: ByteLRU[dict[str, np.ndarray]] = ByteLRU(
            mib(cfg.params["prompt_cache_mb"]),
            size=lambda out: sum(a.nbytes for a in out.values()),
        )

    @torch.inference_mode()
    def encode(self, text: str, text_2: str | None = None, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """One text → ``([1, 77, D], [1, P])`` float32: diffusers' ``prompt_embeds`` and pooled embeddings (``P`` = 0
        for SD 1.x/2.x, which has none). SDXL: ``text_2`` goes to the second encoder (default: ``text``).

        ``clip_skip`` (A1111's numbering; diffusers' ``clip_skip`` + 1): SD takes ``hidden_states[-clip_skip]``
        through the final layer norm (1: the last hidden state, as without it); SDXL
        ``hidden_states[-(clip_skip + 1)]`` of both encoders (1: the penultimate, its default), as diffusers defines
        them. The pooled embedding stays the last layer's.
        """
        dev = self.cfg.device
        if not self.info.is_sdxl:
            ids = self._tokenize(0, [text])
            mask = ids.attention_mask.to(dev) if self.use_attention_mask else None
            if clip_skip == 1:
                hidden = self.models[0](ids.input_ids.to(dev), attention_mask=mask)[0]
            else:
                out = self.models[0](ids.input_ids.to(dev), attention_mask=mask, output_hidden_states=True)
                hidden = final_layer_norm(self.models[0])(out.hidden_states[-clip_skip])
            return hidden.float().cpu(), torch.zeros(1, 0)
        hiddens, pooled = [], None
        for i, (model, part) in enumerate(zip(self.models, (text, text_2 or text), strict=True)):
            out = model(self._tokenize(i, [part]).input_ids.to(dev), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # diffusers: the pooled output of the projection encoder
                pooled = out[0]
            hiddens.append(out.hidden_states[-(clip_skip + 1)])
        if pooled is None:  # ModelInfo.read accepts SDXL only with a CLIPTextModelWithProjection as text_encoder_2
            raise ConfigError(f"{self.cfg.model_name}: no text encoder returned pooled embeddings")
        return torch.cat(hiddens, dim=-1).float().cpu(), pooled.float().cpu()

    def _tokenize(self, i: int, texts: list[str]):
        tokenizer = self.tokenizers[i]
        return tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )

    def encode_request(self, request: GenerationRequest, adapters: Sequence[AdapterRef] = ()) -> dict[str, np.ndarray]:
        """``PROMPT_EMBEDS`` ``[2, 77, D]`` = (unconditional, conditional) with CFG, else ``[1, 77, D]``, and
        ``POOLED_EMBEDS`` ``[2 or 1, P]`` in the same order.

        The negative prompt defaults to ``""`` exactly as diffusers' ``encode_prompt`` does; on an SDXL model with
        ``force_zeros_for_empty_prompt`` an absent negative prompt gives zero embeddings instead, as diffusers'.
        SDXL: ``PROMPT_2``/``NEGATIVE_PROMPT_2`` go to the second encoder (defaults: ``PROMPT``/the negative prompt).
        Text-encoder LoRA layers of ``adapters`` are patched in for this encode and restored right after (also on
        failure).
        """
        if not self.info.is_sdxl:
            reject_sdxl_only(request, self.info.arch_label, ("PROMPT_2", "NEGATIVE_PROMPT_2"))
        self.check_clip_skip(request.clip_skip)
        key = self.cache_key(request, adapters)
        cached = self.cache.get(key)
        if cached is not None:
            return {name: array.copy() for name, array in cached.items()}
        zero_negative = request.negative_prompt is None and self.info.force_zeros_for_empty_prompt
        texts = [(request.prompt, request.prompt_2)]
        if request.do_classifier_free_guidance and not zero_negative:
            negative = request.negative_prompt or ""
            texts.insert(0, (negative, request.negative_prompt_2 or negative))
        with self.cfg.compute():
            try:
                for patcher in self.patchers:
                    patcher.ensure(tuple(adapters))
                # One encode per text, as diffusers encodes the prompt and the negative prompt: a batch of two can
                # differ from two batches of one in the last bits.
                parts = [self.encode(*text, request.clip_skip) for text in texts]
                embeds, pooled = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            finally:
                for patcher in self.patchers:
                    patcher.restore()
        if request.do_classifier_free_guidance and zero_negative:
            embeds = torch.cat([torch.zeros_like(embeds), embeds])
            pooled = torch.cat([torch.zeros_like(pooled), pooled])
        out = {"PROMPT_EMBEDS": embeds.numpy(), "POOLED_EMBEDS": pooled.numpy()}
        self.cache.put(key, {name: array.copy() for name, array in out.items()})
        return out

    @staticmethod
    def cache_key(request: GenerationRequest, adapters: Sequence[AdapterRef]) -> tuple:
        """Everything the embeddings depend on besides this stage's model: the four prompts, whether the
        unconditional branch is encoded, the clip skip, and the text-encoder LoRAs (converted file, which changes with the LoRA
        file, and scale).
        """
        return (
            request.prompt,
            request.negative_prompt,
            request.prompt_2,
            request.negative_prompt_2,
            request.do_classifier_free_guidance,
            request.clip_skip,
            adapter_key(adapters),
        )

    def check_clip_skip(self, clip_skip: int) -> None:
        """``CLIP_SKIP`` must name a layer of every encoder (the first: ``CLIP_SKIP`` = its number of layers)."""
        layers = min(m.config.num_hidden_layers for m in self.models)
        if clip_skip > layers:
            raise InvalidRequestError(
                "CLIP_SKIP", f"{clip_skip}: this model's text encoder has layers for 1 .. {layers} only"
            )

    def close(self) -> None:
        self.cache.clear()

    def needs_loras(self, request: GenerationRequest) -> bool:
        """Whether any requested LoRA has text-encoder layers (read from the file header, no conversion).

        Trade-off: the prompt embedding is computed once, before step 0, so text-encoder LoRA layers cannot land
        late; such LoRAs make this stage wait for the load (their load is on the critical path). UNet-only
        LoRAs never wait here.
        """
        return any(has_text_encoder_layers(resolve_lora_path(self.lora_dir, name)) for name in request.lora_names)

    def handle(self, tensors: dict[str, np.ndarray], load_loras: LoadLorasSync | None = None) -> dict[str, np.ndarray]:
        """Triton entry: ``PROMPT``, ``NEGATIVE_PROMPT``, ``GUIDANCE_SCALE``, LoRAs → ``PROMPT_EMBEDS``,
        ``POOLED_EMBEDS``.
        """
        request = parse_request(tensors, self.cfg.limits, only=INPUTS)
        adapters: Sequence[AdapterRef] = ()
        if request.lora_names and load_loras is not None and self.needs_loras(request):
            adapters = load_loras(request.loras)
        return self.encode_request(request, adapters)


def final_layer_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The text model's final layer norm (``CLIPTextModel.text_model.final_layer_norm`` before transformers 5,
    ``CLIPTextModel.final_layer_norm`` since: diffusers' own ``clip_skip`` path still reads the first).
    """
    return getattr(model, "text_model", model).final_layer_norm
