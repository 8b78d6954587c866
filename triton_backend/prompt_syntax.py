"""AUTOMATIC1111 prompt syntax: attention weights, ``BREAK``, 75-token chunks and the "Original" emphasis.

A port of stable-diffusion-webui's ``modules/prompt_parser.parse_prompt_attention``,
``modules/sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`` (with the padding of its
``process_tokens``) and ``modules/sd_emphasis.EmphasisOriginal``, with stdlib/numpy only: the caller brings the
tokenizer and the text encoder. What A1111 does before this (prompt editing ``[a:b:when]`` and alternation
``[a|b]``, ``AND`` composition, extra networks ``<lora:...>``) is not here: with them left in, ``[a:b:0.5]`` parses
as the text ``a:b:0.5`` at weight 1/1.1.

A1111 encodes a prompt chunk by chunk: each chunk is ``chunk_length`` (75) prompt tokens between a ``bos`` and an
``eos`` (77 ids), each chunk goes through the encoder alone, each hidden state is scaled by its tokens' weights
(:func:`apply_emphasis`, per chunk) and the chunks are concatenated along the sequence (77·k vectors).

Chunk layout. A1111's ``next_chunk`` fills a short chunk with ``eos`` *before* the closing ``eos``
(``[bos] tokens [eos]*(76 - n)``); ``process_tokens`` then, when the model's ``id_pad`` differs from ``eos``,
overwrites every position after the *first* ``eos`` with ``id_pad``. ``id_pad`` is ``eos`` for the CLIP-L
encoders (SD1, SDXL's first) and 0 for OpenCLIP (SD2, SDXL's second). So what the encoder sees is
``[bos] tokens [eos] [pad]*(75 - n)``: for a prompt of at most 75 tokens with no syntax this is exactly the
``input_ids`` of diffusers' ``tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`` whenever
``pad`` is ``tokenizer.pad_token_id`` (``<|endoftext|>`` in SD1's and SDXL's first tokenizer, ``!`` = 0 in SD2's
and SDXL's second, which is A1111's ``id_pad`` of each), and the multipliers are all 1.0 (even then A1111's
emphasis changes a half-precision encoder output: see :func:`apply_emphasis`). The two layouts of
:func:`tokenize_line` differ only for a prompt whose tokens contain ``eos`` itself (HF tokenizers map a literal
``<|endoftext|>`` to it): A1111 pads over the rest of that chunk, diffusers keeps it. Other differences from
diffusers: over 75 tokens diffusers truncates, A1111 adds chunks; A1111 tokenizes each weight run separately
(:func:`has_syntax` tells when a prompt has any).

Negative prompt. A1111 encodes the prompt and the negative prompt separately, each to its own number of chunks
(an empty one to one chunk, ``tokenize_line("")``). When the counts differ it does not pad by default:
the UNet runs the cond and the uncond batches apart, with cross-attention over 77·k and 77·m vectors.
Only the ``pad_cond_uncond`` option (off by default) appends encoded empty prompts ("") to the shorter one, and
``pad_cond_uncond_v0`` (off; DDIM before 1.6.0) repeats the uncond's last vector or truncates the uncond. For
SDXL an all-empty negative prompt is encoded as zeros (``sd_models_xl.get_learned_conditioning``), and the
pooled embedding is the first chunk's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar

#: ``modules/prompt_parser.re_attention``: escapes, brackets, ``:weight)``, plain text, a lone ``:``.
re_attention = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:([+-]?[.\d]+)\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)

#: ``modules/prompt_parser.re_break``: the word ``BREAK`` with the whitespace around it.
re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)

#: The weight run that stands for ``BREAK`` in :func:`parse_prompt_attention`'s result.
BREAK = ("BREAK", -1.0)

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    r"""Split ``text`` into runs of ``(text, weight)``, as A1111's ``prompt_parser.parse_prompt_attention``.

    ``(abc)`` multiplies the weight by 1.1, ``[abc]`` by 1/1.1, ``(abc:3.12)`` by 3.12; ``\(`` ``\)`` ``\[``
    ``\]`` ``\\`` are literal characters (a lone ``\`` is dropped); a bracket left open applies to the end, a
    closing one with nothing open is text; ``BREAK`` (a whole word, outside brackets) becomes :data:`BREAK`
    (inside brackets its weight is scaled and it is plain text again). Adjacent runs of equal weight are merged;
    an empty result is ``[("", 1.0)]``. A ``:weight)`` that is not a number (``(a:1.2.3)``) raises ``ValueError``,
    as in A1111.
    """
    res: list[list[Any]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start_position: int, multiplier: float) -> None:
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

    for m in re_attention.finditer(text):
        part = m.group(0)
        weight = m.group(1)

        if part.startswith("\\"):
            res.append([part[1:], 1.0])
        elif part == "(":
            round_brackets.append(len(res))
        elif part == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif part == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_BRACKET_MULTIPLIER)
        elif part == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            for i, piece in enumerate(re.split(re_break, part)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([piece, 1.0])

    for pos in round_brackets:
        multiply_range(pos, ROUND_BRACKET_MULTIPLIER)
    for pos in square_brackets:
        multiply_range(pos, SQUARE_BRACKET_MULTIPLIER)

    if not res:
        res = [["", 1.0]]

    i = 0
    while i + 1 < len(res):  # merge runs of identical weights
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1

    return [(run, float(weight)) for run, weight in res]


def has_syntax(text: str) -> bool:
    """Whether A1111 reads ``text`` other than as plain text: a weight other than 1.0, a ``BREAK``, or brackets and
    escapes that change the text. ``False`` means one run, tokenized whole, at weight 1.0 (length is not checked:
    over 75 tokens A1111 still chunks where diffusers truncates).
    """
    parsed = parse_prompt_attention(text)
    return not (len(parsed) == 1 and parsed[0] == (text, 1.0))


class PromptChunkFix(NamedTuple):
    """A1111's ``PromptChunkFix``: a textual-inversion embedding's vectors go at ``offset`` of the chunk's prompt
    tokens, i.e. at ``PromptChunk.tokens[offset + 1:]`` (after ``bos``; ``sd_hijack.EmbeddingsWithFixes``).
    """

    offset: int
    embedding: object


@dataclass
class PromptChunk:
    """One encoder input, A1111's ``PromptChunk``: ``tokens`` (``chunk_length + 2`` ids, ``bos`` first),
    ``multipliers`` (one per id, 1.0 at ``bos``, ``eos`` and padding) and ``fixes``.
    """

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[PromptChunkFix] = field(default_factory=list)


#: ``(tokens, offset) -> (embedding, trigger token count, vector count) | None``: a textual-inversion trigger that
#: starts at ``tokens[offset]`` (A1111's ``EmbeddingDatabase.find_embedding_at_position``; ``tokens`` are the ids of
#: one weight run, so a trigger split across runs is not found).
FindEmbedding = Callable[[list[int], int], "tuple[object, int, int] | None"]

#: Token id A1111 puts at each embedding vector's position (the fix replaces its input embedding).
EMBEDDING_PLACEHOLDER = 0


def tokenize_line(
    text: str,
    tokenize: Callable[[list[str]], Sequence[Sequence[int]]],
    *,
    bos: int,
    eos: int,
    pad: int,
    comma_token: int | None,
    chunk_length: int = 75,
    comma_padding_backtrack: int = 20,
    find_embedding: FindEmbedding | None = None,
    layout: Literal["a1111", "diffusers"] = "a1111",
    relocate_fixes: bool = False,
) -> list[PromptChunk]:
    """Split a prompt into chunks, as A1111's ``FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line``.

    ``tokenize`` maps texts to ids without ``bos``/``eos`` (``tokenizer(texts, truncation=False,
    add_special_tokens=False)["input_ids"]``); it gets the runs of :func:`parse_prompt_attention`. A chunk closes
    at a ``BREAK`` and when the next token finds it full (``chunk_length`` tokens). At that point, when the token is
    not a comma, ``comma_padding_backtrack`` is not 0 and the chunk's last comma is at most that many tokens from its
    end, the tokens after the comma move to the next chunk (a comma that itself opened a new chunk is not
    remembered). A textual-inversion trigger (``find_embedding``) becomes ``vector_count`` ids
    :data:`EMBEDDING_PLACEHOLDER` with the run's weight and a :class:`PromptChunkFix`; one that does not fit in the
    current chunk starts the next. As in A1111 a backtrack moves placeholders but not their fix (which then points
    into the old chunk's padding) unless ``relocate_fixes``. The last, partial chunk is kept: an empty prompt gives
    one chunk (A1111's ``empty_chunk``), a trailing ``BREAK`` none more, a leading one an empty first chunk.

    ``layout="a1111"``: A1111's ids (``[bos] tokens [eos]*k``, then ``pad`` after the first ``eos``, as
    ``process_tokens`` does; ``pad`` is the model's ``id_pad``). ``"diffusers"``: ``[bos] tokens [eos] [pad]*k``
    (HF ``padding="max_length"``). Both are the same unless the tokens contain ``eos`` (see the module docstring).
    """
    if layout not in ("a1111", "diffusers"):
        raise ValueError(f"unknown layout {layout!r}; choose 'a1111' or 'diffusers'")
    parsed = parse_prompt_attention(text)
    tokenized = tokenize([run for run, _ in parsed])

    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    last_comma = -1

    def next_chunk() -> None:
        nonlocal chunk, last_comma
        to_add = chunk_length - len(chunk.tokens)
        if layout == "a1111":
            ids = [bos, *chunk.tokens, *[eos] * to_add, eos]
            if pad != eos:  # process_tokens: id_pad after the first id_end
                first_end = ids.index(eos)
                ids[first_end + 1 :] = [pad] * (len(ids) - first_end - 1)
        else:
            ids = [bos, *chunk.tokens, eos, *[pad] * to_add]
        chunk.tokens = ids
        chunk.multipliers = [1.0, *chunk.multipliers, *[1.0] * to_add, 1.0]
        last_comma = -1
        chunks.append(chunk)
        chunk = PromptChunk()

    for tokens, (run, weight) in zip(tokenized, parsed, strict=True):
        if (run, weight) == BREAK:
            next_chunk()
            continue

        tokens = list(tokens)
        position = 0
        while position < len(tokens):
            token = tokens[position]

            if token == comma_token:
                last_comma = len(chunk.tokens)
            elif (
                comma_padding_backtrack != 0
                and len(chunk.tokens) == chunk_length
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= comma_padding_backtrack
            ):
                break_location = last_comma + 1
                reloc_tokens = chunk.tokens[break_location:]
                reloc_mults = chunk.multipliers[break_location:]
                reloc_fixes = [f for f in chunk.fixes if f.offset >= break_location] if relocate_fixes else []
                chunk.tokens = chunk.tokens[:break_location]
                chunk.multipliers = chunk.multipliers[:break_location]
                if relocate_fixes:
                    chunk.fixes = [f for f in chunk.fixes if f.offset < break_location]
                next_chunk()
                chunk.tokens = reloc_tokens
                chunk.multipliers = reloc_mults
                chunk.fixes = [PromptChunkFix(f.offset - break_location, f.embedding) for f in reloc_fixes]

            if len(chunk.tokens) == chunk_length:
                next_chunk()

            found = find_embedding(tokens, position) if find_embedding is not None else None
            if found is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
                continue

            embedding, trigger_length, vector_count = found
            if trigger_length < 1:
                raise ValueError(f"an embedding trigger must span at least one token, got {trigger_length}")
            if vector_count > chunk_length:  # A1111 builds an over-long chunk that CLIP cannot encode
                raise ValueError(f"an embedding of {vector_count} vectors does not fit in a {chunk_length}-token chunk")
            if len(chunk.tokens) + vector_count > chunk_length:
                next_chunk()

            chunk.fixes.append(PromptChunkFix(len(chunk.tokens), embedding))
            chunk.tokens += [EMBEDDING_PLACEHOLDER] * vector_count
            chunk.multipliers += [weight] * vector_count
            position += trigger_length

    if chunk.tokens or not chunks:
        next_chunk()

    return chunks


Z = TypeVar("Z")


def apply_emphasis(z: Z, multipliers: Any, *, normalize: bool = True) -> Z:
    """Scale hidden states by their tokens' weights, as A1111's ``sd_emphasis.EmphasisOriginal.after_transformers``.

    ``z``: ``(B, T, C)`` (a numpy array or a torch tensor: only ``*``, ``/`` and ``.mean()`` are used);
    ``multipliers``: ``(B, T)`` of the same kind. ``z * multipliers``, then times ``z.mean() / new.mean()``, both
    means over the whole tensor (batch, tokens and channels at once: A1111 encodes one chunk index of the texts of
    one call together, usually one text). ``normalize=False`` is the "No norm" option
    (``EmphasisOriginalNoNorm``). All-1.0 multipliers of ``z``'s dtype return ``z`` unchanged. A1111's multipliers
    are float32 (``torch.asarray`` of floats) and its encoder output is half under fp16: the product is float32 and
    ``original_mean`` half-rounded, so even all-1.0 multipliers rescale ``z`` by ``half(mean) / mean`` (up to about
    5e-4); pass float32 multipliers to reproduce that, or skip the call for a prompt without weights.
    """
    x: Any = z
    original_mean = x.mean()
    x = x * multipliers[..., None]
    if normalize:
        new_mean = x.mean()
        x = x * (original_mean / new_mean)
    return x
