"""Tests of quantref.tokenizer: the token ids are llama.cpp's, decoding inverts encoding.

The reference ids in ``tests/data/tokenizer_golden.json`` were made by llama.cpp itself
(through llama-cpp-python, see the file's ``tool`` entry) for the two real models and for
variants of their metadata (another ``tokenizer.ggml.pre``, llama.cpp's defaults for absent
keys), over hand-picked strings and seeded random ones. The tests do not need llama-cpp-python;
to regenerate the file (it does): ``python tests/test_tokenizer.py --regenerate``.
"""

from __future__ import annotations

import json
import random
import re
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantref import gguf, testing
from quantref.tokenizer import (
    PRE_TOKENIZERS,
    ChatTemplateError,
    Tokenizer,
    TokenizerError,
    UnsupportedTokenizerError,
    bytes_to_unicode,
    from_gguf,
    from_metadata,
)

GOLDEN = Path(__file__).resolve().parent / "data" / "tokenizer_golden.json"

# Metadata variants that llama.cpp tokenized for the golden file: (model, overrides); an
# override of None deletes the key, so that llama.cpp's default for an absent key applies.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "smollm2": ("smollm2-135m", {}),
    "smollm2/gpt-2": ("smollm2-135m", {"tokenizer.ggml.pre": "gpt-2"}),
    "smollm2/default": ("smollm2-135m", {"tokenizer.ggml.pre": "default"}),
    "smollm2/qwen2": ("smollm2-135m", {"tokenizer.ggml.pre": "qwen2"}),
    # Llama 3: no add_bos_token key, so llama.cpp's default for llama-bpe (add BOS) applies.
    "smollm2/llama-bpe": ("smollm2-135m", {"tokenizer.ggml.pre": "llama-bpe",
                                           "tokenizer.ggml.add_bos_token": None}),
    "gemma3": ("gemma3-270m", {}),
    # SentencePiece defaults: a dummy space prefix and BOS, with the keys absent.
    "gemma3/space-prefix": ("gemma3-270m", {"tokenizer.ggml.add_space_prefix": None,
                                            "tokenizer.ggml.add_bos_token": None}),
}
FLAGS = ((False, False), (True, False), (True, True))  # (add_special, parse_special)

# Hand-picked strings: whitespace runs, newlines, digits, contractions, scripts, emoji,
# special-token text (whole, partial, spaced), SentencePiece / byte-level spellings, code.
CASES = [
    "", " ", "  ", "   ", "\n", "\n\n", "\n\n\n", " \n ", "\t", "\t\t", "\r\n", "\u00a0", "\u3000",
    "Hello", " Hello", "  Hello", "Hello world", "Hello  world", "Hello   world!",
    "hello\nworld", "hello\n\nworld", "line1\r\nline2", "trailing space ", "trailing spaces   ",
    " leading and trailing ", "1", "12", "123", "1234", "12345678901", "3.14159", "1,000,000",
    "2024-01-31", "v1.2.3", "x=10+20*30", "don't", "I'm", "you're", "we've", "she'll", "he'd",
    "it's", "DON'T", "I'M", "'s", "rock 'n' roll", "'quoted'", "café", "naïve", "Straße",
    "ÀÉÎÕÜ", "Ελληνικά", "Русский текст", "עברית", "العربية", "हिन्दी", "ภาษาไทย",
    "日本語のテキスト", "中文文本", "한국어 텍스트", "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇩🇪",
    "I ❤️ NY", "emoji😀in😀text", "∑ x² ≤ ½", "a\u0301", "\u200b", "\ufeff", "\x00", "\x7f",
    "tab\tseparated\tvalues", "<|im_start|>user\nHi<|im_end|>\n", "<|endoftext|>",
    "<|im_start|><|im_end|>", "<reponame>x", "<bos>text<eos>",
    "<start_of_turn>user\nHi<end_of_turn>\n", "<unused0>", "[multimodal]", "<mask>",
    "<|im_start", "<|im_end|", "< |im_end| >", "▁", "▁▁x", "Ġ", "<0x41>",
    "    def f(x):\n        return x\n", '{"key": [1, 2, 3]}', "https://example.com/path?q=1&r=2",
    "C:\\path\\to\\file", "#include <stdio.h>", "a" * 100, " " * 40, "\n" * 35, "ab" * 50 + "!",
    "Mixed 中文 and English 123 😀 <|im_end|>",
    "▎\U000b78c0",  # byte F2 has no SmolLM2 token: dropped, but it still blocks a merge
]


def read_metadata(path: Path) -> dict[str, Any]:
    with gguf.read(path) as gf:
        return dict(gf.metadata)


def variant_metadata(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    md = dict(base)
    for k, v in overrides.items():
        if v is None:
            md.pop(k, None)
        else:
            md[k] = v
    return md


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def smollm_md(default_model_path) -> dict[str, Any]:
    return read_metadata(default_model_path)


@pytest.fixture(scope="module")
def gemma_md(gemma_model_path) -> dict[str, Any]:
    return read_metadata(gemma_model_path)


@pytest.fixture(scope="module")
def variant(smollm_md, gemma_md):
    """variant(name) -> Tokenizer, built once per module."""
    built: dict[str, Tokenizer] = {}

    def get(name: str) -> Tokenizer:
        if name not in built:
            model, overrides = VARIANTS[name]
            base = smollm_md if model == "smollm2-135m" else gemma_md
            built[name] = from_metadata(variant_metadata(base, overrides), source=name)
        return built[name]

    return get


@pytest.fixture(scope="module")
def smollm(variant) -> Tokenizer:
    return variant("smollm2")


@pytest.fixture(scope="module")
def gemma(variant) -> Tokenizer:
    return variant("gemma3")


# --------------------------------------------------------------------------------------------
# The acceptance figures and llama.cpp's ids
# --------------------------------------------------------------------------------------------


@pytest.mark.model
def test_ppl_1k_default_model_matches_llama_cpp(smollm, ppl_1k_text, golden):
    ids = smollm.encode(ppl_1k_text)  # add_special: the metadata says add_bos_token = false
    # The figures of ../shared/data/README.md (llama.cpp through llama-cpp-python 0.3.36).
    assert len(ids) == 1116
    assert ids[:12] == [25268, 389, 9226, 352, 314, 354, 2321, 4771, 3297, 8552, 284, 16984]
    assert ids == golden["variants"]["smollm2"]["ppl_1k"]
    assert smollm.decode(ids) == ppl_1k_text


@pytest.mark.model
def test_ppl_1k_gemma_matches_llama_cpp(gemma, ppl_1k_text, golden):
    ids = gemma.encode(ppl_1k_text)
    expected = golden["variants"]["gemma3"]["ppl_1k"]
    assert ids[0] == gemma.bos_id == 2 and len(ids) == len(expected) == 1023
    assert ids == expected
    assert gemma.decode(ids[1:]) == ppl_1k_text


@pytest.mark.model
@pytest.mark.parametrize("name", list(VARIANTS))
def test_ids_match_llama_cpp(variant, golden, name):
    tok = variant(name)
    g = golden["variants"][name]
    assert g["overrides"] == VARIANTS[name][1], "golden file is stale: regenerate it"
    mismatches = []
    for text, per_flag in zip(golden["texts"], g["ids"]):
        for (add_special, parse_special), expected in zip(golden["flags"], per_flag):
            got = tok.encode(text, add_special=add_special, parse_special=parse_special)
            if got != expected:
                mismatches.append((text, add_special, parse_special, got, expected))
    assert not mismatches, f"{len(mismatches)} differ from llama.cpp, first: {mismatches[0]}"


@pytest.mark.model
@pytest.mark.parametrize("name", list(VARIANTS))
def test_special_ids_and_flags_match_llama_cpp(variant, golden, name):
    tok = variant(name)
    g = golden["variants"][name]
    assert sorted(tok.eog_ids) == g["eog_ids"]
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == \
        (g["bos_id"], g["eos_id"], g["add_bos"], g["add_eos"])


@pytest.mark.model
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_decoded_bytes_match_llama_cpp_pieces(variant, golden, name):
    """decode renders every token as llama_token_to_piece(special=True) does, and drops
    exactly the tokens llama.cpp hides with special=False."""
    tok = variant(name)
    g = golden["variants"][name]
    for text, per_flag, pieces, shown in zip(golden["texts"], g["ids"], g["pieces_hex"],
                                             g["pieces_nonspecial_hex"]):
        ids = per_flag[golden["flags"].index([True, True])]
        assert tok.decode_bytes(ids) == bytes.fromhex(pieces), text
        assert tok.decode_bytes(ids, skip_special=True) == bytes.fromhex(shown), text


@pytest.mark.model
def test_eog_and_special_tokens(smollm, gemma):
    # llama.cpp's end-of-generation set: EOS, tokens named like <|im_end|> / <|endoftext|> /
    # <end_of_turn> / </s>, and SmolLM2's <reponame> (llama.cpp's FIM "repo" token).
    assert smollm.eog_ids == {0, 2, 4} and smollm.is_eog(2) and not smollm.is_eog(1)
    assert [gemma.tokens[i] for i in sorted(gemma.eog_ids)] == ["<eos>", "<end_of_turn>", "</s>"]
    assert smollm.is_special(1) and smollm.is_control(1) and not smollm.is_special(25268)
    nl2 = gemma.token_to_id("\n\n")  # USER_DEFINED: split out of text, never hidden
    assert gemma.is_special(nl2) and not gemma.is_control(nl2)
    assert gemma.decode([gemma.bos_id, nl2], skip_special=True) == "\n\n"


# --------------------------------------------------------------------------------------------
# Encoding behaviour that follows from llama.cpp's rules
# --------------------------------------------------------------------------------------------


@pytest.mark.model
def test_parse_special_controls_special_token_text(smollm):
    text = "<|im_start|>user\nHi<|im_end|>"
    parsed = smollm.encode(text, parse_special=True)
    assert parsed[0] == 1 and parsed[-1] == 2 and 1 not in parsed[1:-1]
    plain = smollm.encode(text)
    assert 1 not in plain and 2 not in plain  # tokenized as ordinary text
    assert smollm.decode(parsed) == smollm.decode(plain) == text


@pytest.mark.model
def test_user_defined_tokens_are_always_matched(gemma):
    # Gemma's newline and space runs are USER_DEFINED: whole tokens even without parse_special.
    ids = gemma.encode("a\n\n\nb", add_special=False)
    assert gemma.token_to_id("\n\n\n") in ids
    assert gemma.decode(ids) == "a\n\n\nb"


@pytest.mark.model
def test_space_prefix_is_added_per_fragment(variant):
    tok = variant("gemma3/space-prefix")
    assert tok.add_space_prefix and tok.add_bos  # llama.cpp's SentencePiece defaults
    ids = tok.encode("Hello<start_of_turn>Hello", add_special=False, parse_special=True)
    word = tok.token_to_id("▁Hello")
    assert ids == [word, tok.token_to_id("<start_of_turn>"), word]
    # decode strips the one space encode added at the start, so text without special tokens
    # comes back as it was...
    assert tok.decode(tok.encode("Hello world, again.")) == "<bos>Hello world, again."
    assert tok.decode(tok.encode("Hello world, again.", add_special=False)) == "Hello world, again."
    # ...but after a special token llama.cpp adds another, which stays: Gemma's "  " (two
    # spaces) is a USER_DEFINED token, so "world" after it is encoded as "▁world".
    assert tok.decode(tok.encode("Hello  world", add_special=False)) == "Hello   world"


def test_golden_cases_tell_the_variants_apart(golden):
    """Each pre-tokenizer family (and each default) changes some ids, so matching llama.cpp on
    every variant is not vacuous."""
    names = list(VARIANTS)
    for a in names:
        for b in names:
            if a < b and VARIANTS[a][0] == VARIANTS[b][0]:
                assert golden["variants"][a]["ids"] != golden["variants"][b]["ids"], (a, b)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


@pytest.mark.model
@settings(max_examples=150, deadline=None)
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=60))
def test_byte_level_round_trip(smollm, text):
    """decode(encode(text)) == text for byte-level BPE, but for the bytes SmolLM2's vocabulary
    lacks (21 of 256 have no token), which llama.cpp drops, and so does encode."""
    alphabet = {b for b, c in bytes_to_unicode().items() if smollm.token_to_id(c) is not None}
    kept = bytes(b for b in text.encode() if b in alphabet)
    for parse_special in (False, True):  # special tokens decode to their own text
        ids = smollm.encode(text, add_special=False, parse_special=parse_special)
        assert smollm.decode_bytes(ids) == kept
    if len(alphabet) == 256 or all(b in alphabet for b in text.encode()):
        assert smollm.decode(smollm.encode(text)) == text


@pytest.mark.model
@settings(max_examples=100, deadline=None)
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=60))
def test_sentencepiece_round_trip(gemma, text):
    """For SentencePiece what holds is decode(encode(text)) == text with "▁" read as a space:
    spaces are encoded as "▁", so a "▁" in the text comes back as a space. Every byte survives
    (byte fallback), and USER_DEFINED / CONTROL tokens decode to their text."""
    for parse_special in (False, True):
        ids = gemma.encode(text, add_special=True, parse_special=parse_special)
        assert ids[0] == gemma.bos_id
        assert gemma.decode(ids[1:]) == text.replace("▁", " ")


def test_partial_utf8_and_streaming(tiny):
    ids = tiny.encode("日本😀")
    assert len(ids) == 10  # one byte token per UTF-8 byte: the tiny vocabulary has no merges
    # A prefix of the ids can end inside a character: that tail becomes U+FFFD, not an error.
    assert tiny.decode(ids[:-1]) == "日本\ufffd"
    decoder = tiny.incremental_decoder()
    streamed = "".join(decoder.decode(tiny.token_to_bytes(i)) for i in ids)
    assert streamed + decoder.decode(b"", final=True) == "日本😀"


def test_decode_accepts_arrays_and_rejects_bad_ids(tiny):
    ids = tiny.encode("Hello world")
    assert tiny.decode(np.array(ids, dtype=np.int32)) == "Hello world"
    assert tiny.decode([]) == ""
    with pytest.raises(ValueError, match=r"ids\[1\] = 267 is out of range"):
        tiny.decode([0, 267])
    with pytest.raises(ValueError, match="out of range"):
        tiny.token_to_bytes(-1)
    with pytest.raises(ValueError, match="1-D sequence of ints"):
        tiny.decode([1.5])


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------


@pytest.mark.model
def test_chat_template_of_default_model(smollm):
    text = smollm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    no_prompt = smollm.apply_chat_template([{"role": "system", "content": "S"},
                                            {"role": "user", "content": "Q"}],
                                           add_generation_prompt=False)
    assert no_prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
    ids = smollm.encode(text, parse_special=True)
    assert ids.count(1) == 3 and ids.count(2) == 2


def test_chat_template_environment(tiny_md):
    # HF's settings: trim_blocks / lstrip_blocks, loop controls, bos/eos text, raise_exception,
    # a tojson that keeps non-ASCII.
    template = ("{{ bos_token }}{% for m in messages %}\n"  # trim_blocks drops the newline
                "    {% if m.role == 'skip' %}{% continue %}{% endif %}\n"  # lstrip: the indent
                "{{ m.content | tojson }};{% endfor %}\n"
                "{% if messages | length > 2 %}{{ raise_exception('too many') }}{% endif %}"
                "{{ eos_token }}")
    tok = from_metadata({**tiny_md, "tokenizer.chat_template": template})
    msgs = [{"role": "user", "content": "é"}, {"role": "skip", "content": "x"}]
    assert tok.apply_chat_template(msgs) == '<|endoftext|>"é";<|endoftext|>'  # bos = eos = 0
    with pytest.raises(ChatTemplateError, match="too many"):
        tok.apply_chat_template(msgs * 2)
    with pytest.raises(TypeError, match=r"messages\[0\] must be a mapping"):
        tok.apply_chat_template(["no mapping"])  # a message without a role is the template's
    # business, as in transformers (tests/test_chat_template.py checks the rest against it)
    bad = from_metadata({**tiny_md, "tokenizer.chat_template": "{% for %}"})
    with pytest.raises(ChatTemplateError, match="does not compile"):
        bad.apply_chat_template(msgs)


@pytest.mark.model
def test_no_chat_template_is_a_clear_error(gemma):
    assert gemma.chat_template is None  # this Gemma GGUF carries none
    with pytest.raises(ChatTemplateError, match="tokenizer.chat_template is absent"):
        gemma.apply_chat_template([{"role": "user", "content": "Hi"}])


# --------------------------------------------------------------------------------------------
# The tiny byte-level vocabulary of quantref.testing, and bad metadata
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """quantref.testing's tiny Llama: 3 CONTROL tokens, the 256 byte symbols in byte order,
    then merged tokens; pre = smollm, bos = eos = 0."""
    return testing.write_tiny_llama(tmp_path_factory.mktemp("tok") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny(tiny_gguf) -> Tokenizer:
    with gguf.read(tiny_gguf) as gf:
        return from_gguf(gf)


@pytest.fixture(scope="module")
def tiny_md(tiny_gguf) -> dict[str, Any]:
    return read_metadata(tiny_gguf)


def test_tiny_vocabulary(tiny):
    byte = testing.FIRST_BYTE_ID  # id of byte 0
    assert tiny.vocab_size == testing.VOCAB_SIZE and tiny.kind == "bpe" and tiny.pre == "smollm"
    he, space_a = tiny.token_to_id("he"), tiny.token_to_id("Ġa")
    assert tiny.encode("the a") == [byte + ord("t"), he, space_a]
    assert tiny.encode(" the<|im_end|>", parse_special=True) == [tiny.token_to_id("Ġthe"), 2]
    assert tiny.encode("\x00\xff") == [byte, byte + 0xC3, byte + 0xBF]  # U+00FF is C3 BF
    assert not tiny.add_bos and tiny.bos_id == tiny.eos_id == 0
    assert tiny.eog_ids == {0, 2}  # EOS and <|im_end|>
    assert tiny.apply_chat_template([{"role": "user", "content": "x"}]).endswith(
        "<|im_start|>assistant\n")


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=40))
def test_tiny_vocabulary_round_trip(tiny, text):
    # All 256 bytes have a token here, so nothing is dropped: an exact round trip.
    for parse_special in (False, True):
        assert tiny.decode(tiny.encode(text, parse_special=parse_special)) == text


@pytest.mark.model
def test_from_gguf(default_model_path, smollm_md):
    with gguf.read(default_model_path) as gf:
        tok = from_gguf(gf)
    assert tok.encode("Hello") == [19556]  # usable after the file is closed
    # Anything with a .metadata mapping will do; its .path names the file in errors.
    assert from_gguf(SimpleNamespace(metadata=smollm_md)).encode("Hello") == [19556]
    with pytest.raises(TypeError, match="metadata mapping"):
        from_gguf(default_model_path)
    bad = {**smollm_md, "tokenizer.ggml.pre": "no-such-pre"}
    with pytest.raises(UnsupportedTokenizerError, match=str(default_model_path)):
        from_gguf(SimpleNamespace(metadata=bad, path=default_model_path))


def _bad(md: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(md)
    for k, v in changes.items():
        key = "tokenizer.ggml." + k
        if v is None:
            out.pop(key)
        else:
            out[key] = v
    return out


@pytest.mark.parametrize("changes, error, message", [
    ({"pre": "no-such-pre"}, UnsupportedTokenizerError,
     r"tokenizer.ggml.pre = 'no-such-pre' is not a supported pre-tokenizer; supported: .*smollm"),
    ({"model": "t5"}, UnsupportedTokenizerError, r"tokenizer.ggml.model = 't5' is not supported"),
    ({"model": None}, TokenizerError, r"tokenizer.ggml.model: missing"),
    ({"tokens": None}, TokenizerError, r"tokenizer.ggml.tokens: missing"),
    ({"tokens": "abc"}, TokenizerError, r"tokens: expected a list of strings"),
    ({"tokens": []}, TokenizerError, r"tokens: empty vocabulary"),
    ({"token_type": [1, 1]}, TokenizerError, r"token_type: has 2 entries for 267 tokens"),
    ({"token_type": [9] * testing.VOCAB_SIZE}, TokenizerError,
     r"token_type: entry 0 = 9 is not a token type"),
    ({"token_type": [1.5] * testing.VOCAB_SIZE}, TokenizerError,
     r"token_type: expected a list of integers"),
    ({"merges": ["Ġt"]}, TokenizerError, r"merges\[0\] = 'Ġt': not two vocabulary tokens"),
    ({"merges": None}, TokenizerError, r"tokenizer.ggml.merges: missing"),
    ({"bos_token_id": 10_000}, TokenizerError, r"bos_token_id: id 10000 is out of range"),
    ({"bos_token_id": True}, TokenizerError, r"bos_token_id: expected an integer"),
    ({"add_bos_token": 1}, TokenizerError, r"add_bos_token: expected a bool"),
])
def test_bad_metadata_names_the_problem(tiny_md, changes, error, message):
    md = _bad(tiny_md, **changes)
    if changes.get("tokens") is not None:
        md["tokenizer.ggml.token_type"] = [1] * len(changes["tokens"])
    with pytest.raises(error, match=message):
        from_metadata(md, source="tiny.gguf")


def test_bad_metadata_more(tiny_md):
    md = tiny_md
    dup = dict(md)
    dup["tokenizer.ggml.tokens"] = md["tokenizer.ggml.tokens"][:-1] + ["Ġ"]
    with pytest.raises(TokenizerError, match=r"token 'Ġ' appears twice \(ids 35 and 266\)"):
        from_metadata(dup)
    no_bos = {**md, "tokenizer.ggml.add_bos_token": True}
    del no_bos["tokenizer.ggml.bos_token_id"]  # llama.cpp's default 11 is a token here
    assert from_metadata(no_bos).encode("a")[0] == 11
    spm = {**md, "tokenizer.ggml.model": "llama", "tokenizer.ggml.token_type":
           [3, 3, 3, 6] + [1] * (len(md["tokenizer.ggml.tokens"]) - 4)}
    with pytest.raises(TokenizerError, match=r"tokens\[3\] = 'Ā' has type BYTE but is not"):
        from_metadata(spm)
    with pytest.raises(TypeError):
        from_metadata(["not", "a", "mapping"])  # type: ignore[arg-type]


def test_encode_rejects_bad_text(tiny):
    with pytest.raises(TypeError, match="text must be str"):
        tiny.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lone surrogate"):
        tiny.encode("a\ud800b")


def test_supported_pre_tokenizers_are_listed():
    for name in ("smollm", "llama-bpe", "qwen2", "default", "gpt-2", "gpt2"):
        assert name in PRE_TOKENIZERS


# --------------------------------------------------------------------------------------------
# Regenerating the golden file (needs llama-cpp-python; not run by pytest)
# --------------------------------------------------------------------------------------------


def _random_texts(seed: int, n: int) -> list[str]:
    """Seeded random strings: half from word-like atoms, half from arbitrary code points."""
    rng = random.Random(seed)
    atoms = list("abcXYZ019 '\"\n\t\r.,;:!?-_()[]{}<>|/\\@#$%^&*+=~`") + [
        "  ", "   ", "\n\n", " \n", "\r\n", "\u00a0", "\u3000", "\u2028", "\x0b", "\x85", "'s",
        "'ll", "'RE", "don't", "hello", " world", "HELLO", "123", "4567", " 89", "é", "ß", "日本語",
        "한국어", "😀", "👍🏽", "👨‍👩‍👧", "∑", "½", "عربي", "ें", "\u0301", "\u200d", "\uE000",
        "\U00030000", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<bos>", "<eos>",
        "<end_of_turn>", "<unused5>", "[multimodal]", "▁", "Ġ", "\t\t", "\n\n\n"]
    out = ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 12))) for _ in range(n // 2)]

    def codepoint() -> str:
        r = rng.random()
        if r < 0.3:
            return chr(rng.randint(0x20, 0x7E))
        if r < 0.4:
            return rng.choice(" \n\t\r\x0b\x0c\x85\u00a0\u1680\u2000\u2028\u202f\u3000\u200b")
        c = rng.randint(0x80, 0x2FFF) if r < 0.6 else rng.randint(0x3000, 0x10FFFF)
        return chr(0x41 if 0xD800 <= c <= 0xDFFF else c)

    out += ["".join(codepoint() for _ in range(rng.randint(1, 30))) for _ in range(n - n // 2)]
    return out


def _write_variant_gguf(path: Path, base: dict[str, Any], overrides: dict[str, Any]) -> None:
    import gguf as gguf_py

    md = variant_metadata(base, overrides)
    w = gguf_py.GGUFWriter(str(path), arch="llama")
    for k, v in md.items():
        if not k.startswith("tokenizer."):
            continue
        if k == "tokenizer.ggml.tokens":
            w.add_token_list(v)
        elif k == "tokenizer.ggml.token_type":
            w.add_token_types(v)
        elif k == "tokenizer.ggml.merges":
            w.add_token_merges(v)
        elif k == "tokenizer.ggml.scores":
            w.add_token_scores(v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            raise ValueError(f"cannot write {k}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def regenerate() -> None:
    import ctypes
    import importlib.metadata

    import llama_cpp

    from quantref.fetch import MODELS, model_path

    ppl_1k = Path(__file__).resolve().parents[2] / "shared" / "data" / "ppl_1k.txt"
    texts = CASES + _random_texts(2024, 80)
    flags = [list(f) for f in FLAGS]
    out: dict[str, Any] = {
        "note": "Token ids computed by llama.cpp for tests/test_tokenizer.py; regenerate with "
                "`python tests/test_tokenizer.py --regenerate`. Each variant is the tokenizer "
                "metadata of a model with `overrides` applied (null = key removed), written to "
                "a tensor-less GGUF and loaded with vocab_only=True. ids[t][f] = tokenize("
                "texts[t], add_bos=flags[f][0], special=flags[f][1]). pieces_hex[t]: the "
                "concatenated llama_token_to_piece(special=true) bytes of ids[t][2]; "
                "pieces_nonspecial_hex[t]: the same with special=false. ppl_1k: the whole of "
                "../shared/data/ppl_1k.txt with add_bos=True, special=False.",
        "tool": f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')} "
                f"(the llama.cpp it vendors), Llama(model_path, vocab_only=True).tokenize("
                f"text.encode(), add_bos=add_special, special=parse_special)",
        "models": {m: {"file": MODELS[m].filename, "sha256": MODELS[m].sha256}
                   for m in {v[0] for v in VARIANTS.values()}},
        "texts": texts,
        "flags": flags,
        "variants": {},
    }
    bases = {m: read_metadata(model_path(m)) for m in out["models"]}
    buf = ctypes.create_string_buffer(4096)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, overrides) in VARIANTS.items():
            path = Path(tmp) / "variant.gguf"
            _write_variant_gguf(path, bases[model], overrides)
            llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

            def pieces(ids: list[int], special: bool) -> str:
                parts = []
                for i in ids:
                    n = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, special)
                    parts.append(buf.raw[:n])
                return b"".join(parts).hex()

            ids = [[llm.tokenize(t.encode(), add_bos=a, special=p) for a, p in FLAGS]
                   for t in texts]
            entry: dict[str, Any] = {
                "model": model,
                "overrides": overrides,
                "bos_id": llama_cpp.llama_vocab_bos(vocab),
                "eos_id": llama_cpp.llama_vocab_eos(vocab),
                "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
                "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
                "eog_ids": [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)],
                "ids": ids,
            }
            if name in ("smollm2", "gemma3"):
                entry["pieces_hex"] = [pieces(per_flag[2], True) for per_flag in ids]
                entry["pieces_nonspecial_hex"] = [pieces(per_flag[2], False) for per_flag in ids]
                entry["ppl_1k"] = llm.tokenize(ppl_1k.read_bytes(), add_bos=True, special=False)
            out["variants"][name] = entry
            del llm
    text = json.dumps(out, ensure_ascii=True, indent=1)
    # One line per id list keeps the file readable and its diffs small.
    text = re.sub(r"\[\s+([-\d,\s]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", "", m[1]) + "]",
                  text)
    GOLDEN.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")


if __name__ == "__main__":
    if sys.argv[1:] == ["--regenerate"]:
        regenerate()
    else:
        print(__doc__)
