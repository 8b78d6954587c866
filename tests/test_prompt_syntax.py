"""A1111 prompt syntax (``triton_backend.prompt_syntax``): attention parsing, chunking, emphasis."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from triton_backend.prompt_syntax import (
    BREAK,
    EMBEDDING_PLACEHOLDER,
    PromptChunk,
    PromptChunkFix,
    apply_emphasis,
    has_syntax,
    parse_prompt_attention,
    tokenize_line,
)

BOS, EOS, COMMA = 49406, 49407, 267


class FakeTokenizer:
    """Each whitespace-separated word (a comma apart) gets a fixed id; ``<eos>`` is ``EOS`` (as a literal
    ``<|endoftext|>`` in an HF tokenizer)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {",": COMMA, "<eos>": EOS}

    def id(self, word: str) -> int:
        return self.vocab.setdefault(word, 1000 + len(self.vocab))

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [[self.id(w) for w in re.findall(r",|[^\s,]+", text)] for text in texts]


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def chunks_of(text: str, tok: FakeTokenizer | None = None, **kwargs) -> list[PromptChunk]:
    kwargs = {"bos": BOS, "eos": EOS, "pad": EOS, "comma_token": COMMA, **kwargs}
    return tokenize_line(text, tok or FakeTokenizer(), **kwargs)


def content(chunk: PromptChunk, pad: int = EOS) -> list[int]:
    """The prompt ids of a chunk: between ``bos`` and the first ``eos``."""
    assert chunk.tokens[0] == BOS
    return chunk.tokens[1 : chunk.tokens.index(EOS)]


def ids(tok: FakeTokenizer, text: str) -> list[int]:
    return tok([text])[0]


# --- parse_prompt_attention ---------------------------------------------------------------------------------------

# The doctests of A1111's prompt_parser.parse_prompt_attention, verbatim.
A1111_DOCTESTS = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    (r"\(literal\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ["a ", 1.0],
            ["house", 1.5730000000000004],
            [" ", 1.1],
            ["on", 1.0],
            [" a ", 1.1],
            ["hill", 0.55],
            [", sun, ", 1.1],
            ["sky", 1.4641000000000006],
            [".", 1.1],
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), A1111_DOCTESTS)
def test_parse_matches_a1111_doctests_exactly(text, expected):
    assert [list(run) for run in parse_prompt_attention(text)] == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\(a\)", [("(a)", 1.0)]),
        (r"\[a\]", [("[a]", 1.0)]),
        (r"a \\ b", [("a \\ b", 1.0)]),
        (r"a\ b", [("a b", 1.0)]),  # a lone backslash is dropped
        ("a\\", [("a", 1.0)]),
        (r"(a\))", [("a)", 1.1)]),
        (r"\(a:1.5\)", [("(a:1.5)", 1.0)]),
    ],
)
def test_parse_escapes(text, expected):
    assert parse_prompt_attention(text) == expected


def test_parse_weights():
    assert parse_prompt_attention("((a))") == [("a", 1.1 * 1.1)]
    assert parse_prompt_attention("((a))")[0][1] == pytest.approx(1.21)
    assert parse_prompt_attention("[a]") == [("a", 1 / 1.1)]
    assert parse_prompt_attention("[[a]]") == [("a", 1 / 1.1 / 1.1)]
    assert parse_prompt_attention("(a:1.5)") == [("a", 1.5)]
    assert parse_prompt_attention("(a:-0.5) b") == [("a", -0.5), (" b", 1.0)]
    assert parse_prompt_attention("(a:.5)") == [("a", 0.5)]
    assert parse_prompt_attention("[(a:1.5)]") == [("a", 1.5 / 1.1)]
    assert parse_prompt_attention("((a:1.5) b)") == [("a", 1.5 * 1.1), (" b", 1.1)]
    # ":weight" closes round brackets only; elsewhere the colon and the number are text
    assert parse_prompt_attention("[a:1.5]") == [("a:1.5", 1 / 1.1)]
    assert parse_prompt_attention("(a:1.5") == [("a:1.5", 1.1)]
    assert parse_prompt_attention("a:1.5)") == [("a:1.5)", 1.0)]
    assert parse_prompt_attention("a: b") == [("a: b", 1.0)]
    # a closer with nothing open is text, an opener left open runs to the end
    assert parse_prompt_attention("a) b] c") == [("a) b] c", 1.0)]
    assert parse_prompt_attention("(a)) b") == [("a", 1.1), (") b", 1.0)]
    assert parse_prompt_attention("a [b (c") == [("a ", 1.0), ("b ", 1 / 1.1), ("c", 1.1 / 1.1)]
    # prompt editing is not parsed here (A1111 does it before): [from:to:when] is weighted text
    assert parse_prompt_attention("[a:b:0.5]") == [("a:b:0.5", 1 / 1.1)]


def test_parse_bad_weight_raises_like_a1111():
    with pytest.raises(ValueError):
        parse_prompt_attention("(a:1.2.3)")


def test_parse_empty():
    assert parse_prompt_attention("") == [("", 1.0)]
    assert parse_prompt_attention("()") == [("", 1.0)]
    assert parse_prompt_attention("[]") == [("", 1.0)]


def test_parse_break():
    assert BREAK == ("BREAK", -1.0)
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), BREAK, ("b", 1.0)]
    assert parse_prompt_attention("a\nBREAK\n b") == [("a", 1.0), BREAK, ("b", 1.0)]
    assert parse_prompt_attention("a BREAK") == [("a", 1.0), BREAK, ("", 1.0)]
    assert parse_prompt_attention("BREAK a") == [("", 1.0), BREAK, ("a", 1.0)]
    assert parse_prompt_attention("a BREAK BREAK b") == [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]
    assert parse_prompt_attention("(a) BREAK b") == [("a", 1.1), ("", 1.0), BREAK, ("b", 1.0)]
    # a whole word only, and upper case only
    assert parse_prompt_attention("aBREAKb break") == [("aBREAKb break", 1.0)]
    # inside brackets the BREAK run is weighted too, so it is no BREAK any more
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]


def test_has_syntax():
    for plain in ["", "a cat, photo", "a: b", "a:1.5)", "a) b]", "aBREAKb", "a, b; c!", "x" * 500]:
        assert not has_syntax(plain), plain
    for syntax in ["(a)", "[a]", "(a:1.5)", "(a:1)", "a ()", r"\(a\)", r"a\ b", "a BREAK b", "(a)) b", "(unbalanced"]:
        assert has_syntax(syntax), syntax


# --- tokenize_line ------------------------------------------------------------------------------------------------


def test_short_prompt_is_one_padded_chunk():
    tok = FakeTokenizer()
    [chunk] = chunks_of("a photo of a cat", tok)
    prompt = ids(tok, "a photo of a cat")
    assert chunk.tokens == [BOS, *prompt, *[EOS] * (76 - len(prompt))]
    assert chunk.multipliers == [1.0] * 77
    assert chunk.fixes == []


def test_empty_prompt_is_one_chunk():
    [chunk] = chunks_of("")
    assert chunk.tokens == [BOS] + [EOS] * 76
    assert chunk.multipliers == [1.0] * 77
    [chunk] = chunks_of("", pad=0)
    assert chunk.tokens == [BOS, EOS] + [0] * 75


def test_100_tokens_make_two_chunks():
    tok = FakeTokenizer()
    prompt = ids(tok, words(100))
    first, second = chunks_of(words(100), tok)
    assert first.tokens == [BOS, *prompt[:75], EOS]
    assert second.tokens == [BOS, *prompt[75:], *[EOS] * 51]
    assert all(len(c.tokens) == len(c.multipliers) == 77 for c in (first, second))


@pytest.mark.parametrize(("n", "count"), [(1, 1), (74, 1), (75, 1), (76, 2), (150, 2), (151, 3)])
def test_chunk_count(n, count):
    tok = FakeTokenizer()
    chunks = chunks_of(words(n), tok)
    assert len(chunks) == count
    assert [t for c in chunks for t in content(c)] == ids(tok, words(n))


def test_comma_backtrack_moves_the_words_after_the_last_comma():
    tok = FakeTokenizer()
    text = f"{words(70)} , {words(10, 70)}"
    first, second = chunks_of(text, tok)
    assert content(first) == ids(tok, f"{words(70)} ,")  # 71 tokens, then padding
    assert first.tokens[72:] == [EOS] * 5
    assert content(second) == ids(tok, words(10, 70))


@pytest.mark.parametrize("backtrack", [0, 4])
def test_comma_backtrack_off_or_too_far_splits_at_75(backtrack):
    tok = FakeTokenizer()
    text = f"{words(70)} , {words(10, 70)}"
    first, second = chunks_of(text, tok, comma_padding_backtrack=backtrack)
    assert content(first) == ids(tok, text)[:75]  # the comma is 5 tokens from the end
    assert content(second) == ids(tok, text)[75:]


def test_comma_backtrack_limit_is_inclusive():
    tok = FakeTokenizer()
    text = f"{words(55)} , {words(30, 55)}"  # the comma at 55: 75 - 55 = 20 tokens from the end
    first, _ = chunks_of(text, tok)
    assert len(content(first)) == 56
    first, _ = chunks_of(text, tok, comma_padding_backtrack=19)
    assert len(content(first)) == 75


def test_comma_that_opens_a_chunk_is_not_remembered():
    # A1111 records the comma, then next_chunk() forgets it: the comma starts chunk 2 and is no backtrack point.
    tok = FakeTokenizer()
    text = f"{words(75)} , {words(80, 75)}"
    chunks = chunks_of(text, tok)
    assert [len(content(c)) for c in chunks] == [75, 75, 6]
    assert content(chunks[1])[0] == COMMA


def test_comma_backtrack_with_a_small_chunk_length():
    tok = FakeTokenizer()
    chunks = chunks_of("a b , c d e f", tok, chunk_length=5, comma_padding_backtrack=3)
    assert [content(c) for c in chunks] == [ids(tok, "a b ,"), ids(tok, "c d e f")]
    assert all(len(c.tokens) == 7 for c in chunks)


def test_break_forces_a_new_chunk():
    tok = FakeTokenizer()
    first, second = chunks_of("a b BREAK c", tok)
    assert first.tokens == [BOS, *ids(tok, "a b"), *[EOS] * 74]
    assert second.tokens == [BOS, *ids(tok, "c"), *[EOS] * 75]


def test_break_edges():
    tok = FakeTokenizer()
    assert len(chunks_of("a BREAK", tok)) == 1  # the empty run after it adds no chunk
    empty, second = chunks_of("BREAK a", tok)  # before it: an empty chunk
    assert empty.tokens == [BOS] + [EOS] * 76
    assert content(second) == ids(tok, "a")
    assert len(chunks_of("a BREAK BREAK b", tok)) == 3
    # a full chunk is closed by the BREAK, not once more
    assert [len(content(c)) for c in chunks_of(f"{words(75)} BREAK b", tok)] == [75, 1]
    # the last comma does not survive a BREAK
    assert [len(content(c)) for c in chunks_of(f"a , BREAK {words(80)}", tok)] == [2, 75, 5]


def test_multipliers_follow_the_tokens():
    tok = FakeTokenizer()
    [chunk] = chunks_of("a (b c) [d] (e:1.5)", tok)
    assert content(chunk) == ids(tok, "a b c d e")
    assert chunk.multipliers[:7] == [1.0, 1.0, 1.1, 1.1, 1 / 1.1, 1.5, 1.0]
    assert chunk.multipliers[7:] == [1.0] * 70
    first, second = chunks_of(f"{words(74)} (x y)", tok)
    assert first.multipliers[-2:] == [1.1, 1.0]
    assert second.multipliers[:3] == [1.0, 1.1, 1.0]


def test_weight_runs_are_tokenized_apart():
    seen: list[list[str]] = []

    def tokenize(texts: list[str]) -> list[list[int]]:
        seen.append(texts)
        return FakeTokenizer()(texts)

    tokenize_line("an (important) word BREAK x", tokenize, bos=BOS, eos=EOS, pad=EOS, comma_token=COMMA)
    assert seen == [["an ", "important", " word", "BREAK", "x"]]


@pytest.mark.parametrize("pad", [EOS, 0])
def test_layouts_agree_on_ordinary_prompts(pad):
    for text in ["", "a cat", words(75), words(100), f"{words(70)} , {words(30)}", "a BREAK (b:1.2)"]:
        a1111 = chunks_of(text, pad=pad, layout="a1111")
        diffusers = chunks_of(text, pad=pad, layout="diffusers")
        assert a1111 == diffusers
    [chunk] = chunks_of("a b", pad=0)
    assert chunk.tokens[:4] == [BOS, *ids(FakeTokenizer(), "a b"), EOS]
    assert chunk.tokens[4:] == [0] * 73


def test_layouts_differ_when_the_prompt_holds_eos():
    # A1111's process_tokens puts id_pad after the FIRST id_end: the rest of the prompt is padded over.
    tok = FakeTokenizer()
    [a1111] = chunks_of("a <eos> b", tok, pad=0, layout="a1111")
    [diffusers] = chunks_of("a <eos> b", tok, pad=0, layout="diffusers")
    a, b = ids(tok, "a b")
    assert a1111.tokens == [BOS, a, EOS] + [0] * 74
    assert diffusers.tokens == [BOS, a, EOS, b, EOS] + [0] * 72
    assert a1111.multipliers == diffusers.multipliers == [1.0] * 77
    # with pad == eos (SD1's CLIP) there is nothing to overwrite
    [same] = chunks_of("a <eos> b", tok, pad=EOS, layout="a1111")
    assert same.tokens == [BOS, a, EOS, b] + [EOS] * 73


def test_unknown_layout():
    with pytest.raises(ValueError, match="layout"):
        chunks_of("a", layout="comfy")


@pytest.mark.parametrize("pad_token", [None, "!"])
def test_diffusers_layout_matches_a_real_clip_tokenizer(tmp_path: Path, pad_token):
    from transformers import CLIPTokenizer

    from triton_backend.tools.default_model import build_tokenizer_files

    build_tokenizer_files(tmp_path)
    extra = {"pad_token": pad_token} if pad_token else {}
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77, **extra)

    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    for prompt in ["", "a photo of a cat", "a red house, art style, photo"]:
        expected = tokenizer(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
        for layout in ("a1111", "diffusers"):
            [chunk] = tokenize_line(
                prompt,
                tokenize,
                bos=tokenizer.bos_token_id,
                eos=tokenizer.eos_token_id,
                pad=tokenizer.pad_token_id,
                comma_token=tokenizer.get_vocab()[",</w>"],
                layout=layout,
            )
            assert chunk.tokens == expected, (prompt, layout)


class Embedding:
    def __init__(self, name: str, vectors: int):
        self.name, self.vectors = name, vectors

    def __repr__(self) -> str:
        return f"Embedding({self.name})"


def embedding_finder(tok: FakeTokenizer, triggers: dict[str, Embedding]):
    """A1111's find_embedding_at_position over whole-word triggers (several words each)."""
    table = {tuple(ids(tok, trigger)): emb for trigger, emb in triggers.items()}

    def find(tokens: list[int], offset: int):
        for trigger, emb in sorted(table.items(), key=lambda kv: -len(kv[0])):
            if tuple(tokens[offset : offset + len(trigger)]) == trigger:
                return emb, len(trigger), emb.vectors
        return None

    return find


def test_embedding_becomes_placeholders_and_a_fix():
    tok = FakeTokenizer()
    emb = Embedding("style", 3)
    [chunk] = chunks_of("a my style b", tok, find_embedding=embedding_finder(tok, {"my style": emb}))
    a, b = ids(tok, "a b")
    assert chunk.tokens[:7] == [BOS, a, *[EMBEDDING_PLACEHOLDER] * 3, b, EOS]
    assert chunk.fixes == [PromptChunkFix(1, emb)]  # after bos: tokens[2:5]
    assert chunk.fixes[0].offset + 1 == chunk.tokens.index(EMBEDDING_PLACEHOLDER)


def test_weighted_embedding_gets_the_weight_on_every_vector():
    tok = FakeTokenizer()
    emb = Embedding("e", 2)
    [chunk] = chunks_of("a (e:1.3)", tok, find_embedding=embedding_finder(tok, {"e": emb}))
    assert chunk.multipliers[:5] == [1.0, 1.0, 1.3, 1.3, 1.0]


def test_embedding_that_does_not_fit_starts_the_next_chunk():
    tok = FakeTokenizer()
    emb = Embedding("e", 5)
    first, second = chunks_of(f"{words(72)} e x", tok, find_embedding=embedding_finder(tok, {"e": emb}))
    assert content(first) == ids(tok, words(72))  # 72 + 5 > 75
    assert first.fixes == []
    assert second.tokens[:8] == [BOS, *[EMBEDDING_PLACEHOLDER] * 5, ids(tok, "x")[0], EOS]
    assert second.fixes == [PromptChunkFix(0, emb)]
    # exactly filling the chunk is fine
    [chunk] = chunks_of(f"{words(70)} e", tok, find_embedding=embedding_finder(tok, {"e": emb}))
    assert chunk.fixes == [PromptChunkFix(70, emb)]
    assert chunk.tokens[71:76] == [EMBEDDING_PLACEHOLDER] * 5


def test_comma_backtrack_leaves_the_fix_behind_like_a1111():
    # 68 words, a comma (at 68), a 3-vector embedding (69..71), 4 words: at the 4th word the chunk is full and the
    # comma 7 tokens from its end, so the placeholders and 3 words move on.
    tok = FakeTokenizer()
    emb = Embedding("e", 3)
    text = f"{words(68)} , e {words(4, 68)}"
    find = embedding_finder(tok, {"e": emb})
    first, second = chunks_of(text, tok, find_embedding=find)
    assert len(content(first)) == 69
    assert content(second)[:3] == [EMBEDDING_PLACEHOLDER] * 3
    assert first.fixes == [PromptChunkFix(69, emb)]  # stale: points into the padding
    assert second.fixes == []
    first, second = chunks_of(text, tok, find_embedding=find, relocate_fixes=True)
    assert first.fixes == []
    assert second.fixes == [PromptChunkFix(0, emb)]


def test_embedding_errors():
    tok = FakeTokenizer()
    with pytest.raises(ValueError, match="does not fit"):
        chunks_of("e", tok, find_embedding=lambda tokens, offset: (object(), 1, 76))
    with pytest.raises(ValueError, match="at least one token"):
        chunks_of("e", tok, find_embedding=lambda tokens, offset: (object(), 0, 1))


# --- apply_emphasis -----------------------------------------------------------------------------------------------


def test_emphasis_scales_and_restores_the_mean():
    rng = np.random.default_rng(0)
    z = rng.normal(0.1, 1.0, (2, 77, 16)).astype(np.float32)
    multipliers = rng.uniform(0.5, 1.5, (2, 77)).astype(np.float32)
    out = apply_emphasis(z, multipliers)
    assert out.shape == z.shape
    assert out.mean() == pytest.approx(z.mean(), rel=1e-4)
    ratio = out / (z * multipliers[..., None])
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)  # one factor for the whole batch
    np.testing.assert_allclose(out, z * multipliers[..., None] * (z.mean() / (z * multipliers[..., None]).mean()))


def test_emphasis_without_norm_and_with_unit_weights():
    rng = np.random.default_rng(1)
    z = rng.normal(0.1, 1.0, (1, 77, 8)).astype(np.float32)
    multipliers = rng.uniform(0.5, 1.5, (1, 77)).astype(np.float32)
    np.testing.assert_array_equal(apply_emphasis(z, multipliers, normalize=False), z * multipliers[..., None])
    assert np.array_equal(apply_emphasis(z, np.ones((1, 77), np.float32)), z)


def test_emphasis_on_half_z_with_float32_weights_is_float32():
    rng = np.random.default_rng(2)
    z = rng.normal(0.1, 1.0, (1, 77, 8)).astype(np.float16)
    out = apply_emphasis(z, np.ones((1, 77), np.float32))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, z.astype(np.float32), rtol=1e-3)


def test_emphasis_on_torch_matches_a1111_code():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 77, 16, generator=g)
    multipliers = torch.rand(2, 77, generator=g) + 0.5
    # EmphasisOriginal.after_transformers, verbatim
    original_mean = z.mean()
    expected = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)  # noqa: RUF005
    new_mean = expected.mean()
    expected = expected * (original_mean / new_mean)
    assert torch.equal(apply_emphasis(z, multipliers), expected)
