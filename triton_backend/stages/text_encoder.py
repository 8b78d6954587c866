"""Stage ``text_encoder``: prompts → CLIP hidden states (+ SDXL pooled embeddings), as diffusers' ``encode_prompt``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch

from ..cache import ByteLRU
from ..config import StageConfig
from ..embeddings import Embedding, EmbeddingStore
from ..errors import ConfigError, InvalidRequestError
from ..lora.patch import AdapterRef, WeightPatcher, adapter_key
from ..lora.store import has_text_encoder_layers, resolve_lora_path
from ..model_info import ModelInfo, load_part
from ..parameters import mib
from ..paths import embedding_dir, lora_dir
from ..prompt_syntax import PromptChunk, apply_emphasis, has_syntax, parse_prompt_attention, tokenize_line
from ..schema import TEXT_ENCODER_INPUTS, GenerationRequest, parse_request, reject_sdxl_only

#: The request fields this stage consumes.
INPUTS = TEXT_ENCODER_INPUTS

#: Prompt tokens per chunk (CLIP's 77 positions less ``bos`` and ``eos``), as A1111 and diffusers count them.
CHUNK_TOKENS = 75
#: The most chunks a prompt may take (the UNet's cross-attention grows with them).
MAX_CHUNKS = 16
#: The largest weight ``(word:w)`` accepted, either sign (A1111 has no bound; beyond this it is a mistake).
MAX_WEIGHT = 100.0

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
        widths = tuple(int(m.get_input_embeddings().weight.shape[1]) for m in self.models)
        #: Textual-inversion embeddings by trigger word (parameter ``embedding_dir``), read as files change.
        self.embeddings = EmbeddingStore(embedding_dir(cfg.params, cfg.model_dir), widths)
        self._triggers: dict[tuple[int, str], tuple[int, ...]] = {}
        #: Prompt embeddings of recent requests (parameter ``prompt_cache_mb``, 0 = off); see :meth:`cache_key`.
        self.cache: ByteLRU[dict[str, np.ndarray]] = ByteLRU(
            mib(cfg.params["prompt_cache_mb"]),
            size=lambda out: sum(a.nbytes for a in out.values()),
        )

    @torch.inference_mode()
    def encode(
        self,
        text: str,
        text_2: str | None = None,
        clip_skip: int = 1,
        embeddings: dict[str, Embedding] | None = None,
        field: str = "PROMPT",
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One text → its chunks (``[1, 77, D]`` float32 each) and its pooled embedding ``[1, P]`` (``P`` = 0 for
        SD 1.x/2.x, which has none). SDXL: ``text_2`` goes to the second encoder (default: ``text``).

        A plain prompt (at most 75 tokens, no A1111 syntax, no embedding) is one chunk, tokenized exactly as
        diffusers' ``encode_prompt`` (so its image is diffusers'). Otherwise it is encoded as A1111 does
        (:mod:`triton_backend.prompt_syntax`): 75-token chunks, each between its own ``bos``/``eos`` and encoded
        alone, weights applied with A1111's "Original" emphasis, textual-inversion vectors (``embeddings``, by
        trigger word) in place of their triggers; SDXL's pooled embedding is the first chunk's.

        ``clip_skip`` (A1111's numbering; diffusers' ``clip_skip`` + 1): SD takes ``hidden_states[-clip_skip]``
        through the final layer norm (1: the last hidden state, as without it); SDXL
        ``hidden_states[-(clip_skip + 1)]`` of both encoders (1: the penultimate, its default), as diffusers defines
        them. The pooled embedding stays the last layer's.
        """
        parts = (text, text_2 or text) if self.info.is_sdxl else (text,)
        embeddings = embeddings or {}
        chunked = [self._chunks(i, part, embeddings, field) for i, part in enumerate(parts)]
        per_encoder: list[list[torch.Tensor]] = []
        pooled = torch.zeros(1, 0)
        for i, chunks in enumerate(chunked):
            if chunks is None:  # plain: diffusers' tokenization
                hidden, pool = self._run(i, self._tokenize(i, [parts[i]]).input_ids, clip_skip)
                per_encoder.append([hidden])
            else:
                per_encoder.append([])
                for j, chunk in enumerate(chunks):
                    fixes = [(fix.offset + 1, cast(Embedding, fix.embedding).vectors[i]) for fix in chunk.fixes]
                    hidden, chunk_pool = self._run(i, torch.tensor([chunk.tokens]), clip_skip, fixes)
                    if any(m != 1.0 for m in chunk.multipliers):
                        hidden = apply_emphasis(
                            hidden, torch.tensor([chunk.multipliers], dtype=hidden.dtype, device=hidden.device)
                        )
                    per_encoder[-1].append(hidden)
                    pool = chunk_pool if j == 0 else pool
            if pool is not None and pooled.shape[1] == 0:  # SDXL: the projection encoder's (first chunk's)
                pooled = pool
        if self.info.is_sdxl and pooled.shape[1] == 0:
            raise ConfigError(f"{self.cfg.model_name}: no text encoder returned pooled embeddings")
        count = max(len(hs) for hs in per_encoder)
        for i, hs in enumerate(per_encoder):  # (SDXL: the two prompts may need different chunk counts)
            hs += [self._empty_chunk(i, clip_skip)] * (count - len(hs))
        chunks_out = [torch.cat([hs[j] for hs in per_encoder], dim=-1).float().cpu() for j in range(count)]
        return chunks_out, pooled.float().cpu()

    def _run(
        self, i: int, ids: torch.Tensor, clip_skip: int, fixes: Sequence[tuple[int, torch.Tensor]] = ()
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder ``i`` on ``ids [1, 77]`` (embedding vectors written over the token embeddings at ``fixes``):
        ``(hidden [1, 77, D], pooled [1, P] or None)``, with the clip skip.
        """
        model, dev = self.models[i], self.cfg.device
        ids = ids.to(dev)
        with _vectors_at(model, fixes):
            if not self.info.is_sdxl:
                mask = _attention_mask(ids, self.tokenizers[i].eos_token_id) if self.use_attention_mask else None
                if clip_skip == 1:
                    return model(ids, attention_mask=mask)[0], None
                out = model(ids, attention_mask=mask, output_hidden_states=True)
                return final_layer_norm(model)(out.hidden_states[-clip_skip]), None
            out = model(ids, output_hidden_states=True)
            pooled = out[0] if out[0].ndim == 2 else None  # diffusers: the pooled output of the projection encoder
            return out.hidden_states[-(clip_skip + 1)], pooled

    def _tokenize(self, i: int, texts: list[str]):
        """Diffusers' tokenization: padded to 77, truncated."""
        tokenizer = self.tokenizers[i]
        return tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )

    def _empty_chunk_all(self, clip_skip: int) -> torch.Tensor:
        """The empty prompt's chunk through every encoder (features concatenated, as a chunk of :meth:`encode`)."""
        return torch.cat([self._empty_chunk(i, clip_skip) for i in range(len(self.models))], dim=-1).float().cpu()

    def _empty_chunk(self, i: int, clip_skip: int) -> torch.Tensor:
        """Encoder ``i``'s encoding of the empty prompt: what pads a prompt with fewer chunks (A1111's
        ``pad_cond_uncond``: the UNet takes a prompt and its negative prompt in one batch).
        """
        return self._run(i, self._tokenize(i, [""]).input_ids, clip_skip)[0]

    def _trigger(self, i: int, word: str) -> tuple[int, ...]:
        """An embedding's trigger word as encoder ``i``'s tokens (kept: the store is consulted at every request)."""
        key = (i, word)
        if key not in self._triggers:
            tokenizer = self.tokenizers[i]
            self._triggers[key] = tuple(tokenizer(word, add_special_tokens=False, verbose=False)["input_ids"])
        return self._triggers[key]

    def _chunks(self, i: int, text: str, embeddings: dict[str, Embedding], field: str) -> list[PromptChunk] | None:
        """``text``'s A1111 chunks for encoder ``i``, or ``None`` for a plain prompt (diffusers' path)."""
        tokenizer = self.tokenizers[i]

        def tokenize(texts: list[str]) -> list[list[int]]:
            return tokenizer(texts, truncation=False, add_special_tokens=False, verbose=False)["input_ids"]

        ids = tokenize([text])[0]
        for run, weight in parse_prompt_attention(text):
            if run != "BREAK" and not (math.isfinite(weight) and abs(weight) <= MAX_WEIGHT):
                raise InvalidRequestError(
                    field, f"weight {weight:g} of {run.strip()[:40]!r}; allowed -{MAX_WEIGHT} .. {MAX_WEIGHT}"
                )
        triggers = sorted(((self._trigger(i, name), e) for name, e in embeddings.items()), key=lambda t: -len(t[0]))
        used = [e for trigger, e in triggers if _contains(ids, trigger)]
        if not used and len(ids) <= CHUNK_TOKENS and not has_syntax(text):
            return None
        for embedding in used:
            embedding.check(field)

        def find_embedding(tokens: list[int], offset: int) -> tuple[Embedding, int, int] | None:
            for trigger, embedding in triggers:
                if trigger and tuple(tokens[offset : offset + len(trigger)]) == trigger:
                    embedding.check(field)
                    return embedding, len(trigger), embedding.count
            return None

        comma = tokenizer.convert_tokens_to_ids(",</w>")
        chunks = tokenize_line(
            text,
            tokenize,
            bos=tokenizer.bos_token_id,
            eos=tokenizer.eos_token_id,
            pad=tokenizer.pad_token_id,
            comma_token=comma if comma != tokenizer.unk_token_id else None,
            chunk_length=CHUNK_TOKENS,
            find_embedding=find_embedding if used else None,
            layout="diffusers",
            relocate_fixes=True,
        )
        if len(chunks) > MAX_CHUNKS:
            raise InvalidRequestError(
                field,
                f"{len(chunks)} chunks of {CHUNK_TOKENS} tokens; at most {MAX_CHUNKS} "
                f"({MAX_CHUNKS * CHUNK_TOKENS} tokens)",
            )
        return chunks

    def encode_request(self, request: GenerationRequest, adapters: Sequence[AdapterRef] = ()) -> dict[str, np.ndarray]:
        """``PROMPT_EMBEDS`` ``[2, 77·k, D]`` = (unconditional, conditional) with CFG, else ``[1, 77·k, D]``, and
        ``POOLED_EMBEDS`` ``[2 or 1, P]`` in the same order; k = 1 unless a prompt needs more 75-token chunks (the
        other is padded with encodings of the empty prompt to as many chunks).

        The negative prompt defaults to ``""`` exactly as diffusers' ``encode_prompt`` does; on an SDXL model with
        ``force_zeros_for_empty_prompt`` an absent negative prompt gives zero embeddings instead, as diffusers'.
        SDXL: ``PROMPT_2``/``NEGATIVE_PROMPT_2`` go to the second encoder (defaults: ``PROMPT``/the negative prompt).
        Text-encoder LoRA layers of ``adapters`` are patched in for this encode and restored right after (also on
        failure).
        """
        if not self.info.is_sdxl:
            reject_sdxl_only(request, self.info.arch_label, ("PROMPT_2", "NEGATIVE_PROMPT_2"))
        self.check_clip_skip(request.clip_skip)
        embeddings = self.embeddings.current()
        key = (*self.cache_key(request, adapters), tuple(sorted((n, e.version) for n, e in embeddings.items())))
        cached = self.cache.get(key)
        if cached is not None:
            return {name: array.copy() for name, array in cached.items()}
        zero_negative = request.negative_prompt is None and self.info.force_zeros_for_empty_prompt
        texts = [(request.prompt, request.prompt_2, "PROMPT")]
        if request.do_classifier_free_guidance and not zero_negative:
            negative = request.negative_prompt or ""
            texts.insert(0, (negative, request.negative_prompt_2 or negative, "NEGATIVE_PROMPT"))
        with self.cfg.compute():
            try:
                for patcher in self.patchers:
                    patcher.ensure(tuple(adapters))
                # One encode per text, as diffusers encodes the prompt and the negative prompt: a batch of two can
                # differ from two batches of one in the last bits.
                parts = [self.encode(a, b, request.clip_skip, embeddings, field) for a, b, field in texts]
                count = max(len(chunks) for chunks, _ in parts)
                empty = self._empty_chunk_all(request.clip_skip) if count > min(len(c) for c, _ in parts) else None
                embeds = torch.cat([torch.cat(c + [empty] * (count - len(c)), dim=1) for c, _ in parts])  # type: ignore[list-item]
                pooled = torch.cat([p for _, p in parts])
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
        """Everything the embeddings depend on besides this stage's model and its embedding store (whose file
        versions :meth:`encode_request` adds): the four prompts, whether the unconditional branch is encoded, the
        clip skip, and the text-encoder LoRAs (converted file, which changes with the LoRA file, and scale).
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
    return cast(torch.nn.Module, getattr(model, "text_model", model).final_layer_norm)


def _contains(ids: Sequence[int], part: Sequence[int]) -> bool:
    n = len(part)
    return n > 0 and any(tuple(ids[k : k + n]) == tuple(part) for k in range(len(ids) - n + 1))


def _attention_mask(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """1 up to and with the first ``eos``, 0 after (the tokenizer's mask of a ``max_length``-padded prompt)."""
    first = (ids == eos).int().argmax(dim=1, keepdim=True)
    return (torch.arange(ids.shape[1], device=ids.device)[None] <= first).long()


@contextlib.contextmanager
def _vectors_at(model: torch.nn.Module, fixes: Sequence[tuple[int, torch.Tensor]]) -> Iterator[None]:
    """While in the block, ``model``'s token embeddings at ``fixes`` (position, ``[n, D]`` vectors) are the vectors
    (what diffusers' ``load_textual_inversion`` gets by adding tokens whose embedding rows are the vectors).
    """
    if not fixes:
        yield
        return

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for position, vectors in fixes:
            output[:, position : position + vectors.shape[0]] = vectors.to(output.device, output.dtype)
        return output

    embedding = cast(torch.nn.Module, model.get_input_embeddings())  # type: ignore[operator]
    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
