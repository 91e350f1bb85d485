"""Tokenizers built from GGUF metadata, giving the token ids llama.cpp gives.

A GGUF file carries its tokenizer as metadata (``tokenizer.ggml.*``): the vocabulary, the token
types, BPE merges or SentencePiece scores, the special ids and a few flags. This module turns
that metadata into a :class:`Tokenizer` whose ``encode`` mirrors llama.cpp's
``llama_tokenize(text, add_special, parse_special)`` and whose ``decode`` mirrors
``llama_token_to_piece`` (special tokens rendered as their text).

Two vocabulary types are supported, each through a well-kept library that does the merging:

- ``tokenizer.ggml.model = gpt2``: byte-level BPE through Hugging Face ``tokenizers``. The
  pre-tokenizer is llama.cpp's: the regexes it uses for ``tokenizer.ggml.pre``
  (:data:`PRE_TOKENIZERS`), each applied as an isolating split of the pieces the previous one
  left, then GPT-2's byte-to-unicode mapping.
- ``tokenizer.ggml.model = llama``: SentencePiece BPE through ``sentencepiece``, from a
  ``ModelProto`` built out of the tokens, scores and types: no normalization, spaces escaped to
  ``▁``, byte fallback to ``<0xXX>`` tokens.

What llama.cpp does before the merges is done here, in Python, so that both libraries see
exactly the text llama.cpp's own merge loops see: special-token text is split out first
(longest token first; CONTROL and UNKNOWN tokens only when ``parse_special``, USER_DEFINED
tokens always), and SentencePiece's dummy prefix space is added per text fragment that starts
the input or follows a special token. ``docs/tokenizers.md`` lists what is supported.

Chat templates (``tokenizer.chat_template`` and the named ``tokenizer.chat_template.<name>``)
are rendered as Hugging Face transformers renders them (:meth:`Tokenizer.apply_chat_template`):
its jinja environment and its handling of the inputs are rebuilt here, so that transformers is
not a dependency; ``tests/test_chat_template.py`` holds the result to transformers' own.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, lru_cache
from typing import Any

import numpy as np

__all__ = [
    "PRE_TOKENIZERS",
    "TOKEN_BYTE",
    "TOKEN_CONTROL",
    "TOKEN_NORMAL",
    "TOKEN_UNDEFINED",
    "TOKEN_UNKNOWN",
    "TOKEN_UNUSED",
    "TOKEN_USER_DEFINED",
    "ChatTemplateError",
    "PreTokenizer",
    "Tokenizer",
    "TokenizerError",
    "UnsupportedTokenizerError",
    "bytes_to_unicode",
    "from_gguf",
    "from_metadata",
]

# Values of tokenizer.ggml.token_type (llama.cpp's LLAMA_TOKEN_TYPE_*, SentencePiece's piece types).
TOKEN_UNDEFINED = 0
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# Token types llama.cpp splits out of the text before the merges (its "special tokens cache").
_SPECIAL_TYPES = (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN)
# Of those, the ones matched only when parse_special, and hidden by decode(skip_special=True).
_CONTROL_TYPES = (TOKEN_CONTROL, TOKEN_UNKNOWN)

_SPM_SPACE = "\u2581"  # SentencePiece's "▁", which stands for a space inside pieces


class TokenizerError(ValueError):
    """The tokenizer metadata is missing, malformed or inconsistent; the message names the key."""


class UnsupportedTokenizerError(TokenizerError):
    """Well-formed metadata asking for a tokenizer this module does not implement."""


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template failed to compile or render."""


# --------------------------------------------------------------------------------------------
# Byte-level BPE: GPT-2's byte <-> unicode mapping and llama.cpp's pre-tokenizer regexes
# --------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, DEL, NBSP, soft
    hyphen, ...) map, in byte order, to U+0100, U+0101, ... so that no byte becomes whitespace.
    """
    printable = np.zeros(256, dtype=bool)
    for lo, hi in ((ord("!"), ord("~")), (ord("¡"), ord("¬")), (ord("®"), ord("ÿ"))):
        printable[lo : hi + 1] = True
    codepoints = np.arange(256)
    codepoints[~printable] = 256 + np.arange(int((~printable).sum()))
    return {b: chr(int(c)) for b, c in enumerate(codepoints)}


_BYTE_TO_UNICODE = bytes_to_unicode()
# str.translate table: byte-level character -> the character whose code point is the byte value.
_UNICODE_TO_BYTE = {ord(c): b for b, c in _BYTE_TO_UNICODE.items()}
_BYTE_ALPHABET = frozenset(_BYTE_TO_UNICODE.values())


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp pre-tokenizes one ``tokenizer.ggml.pre`` family.

    ``regexes`` are applied in order, each splitting every piece the previous ones produced into
    its matches and the text between them (both kept). ``ignore_merges``: a pre-token that is
    itself in the vocabulary is emitted whole (Llama 3). ``add_bos``: llama.cpp's default for
    ``tokenizer.ggml.add_bos_token`` when the key is absent.
    """

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


# The regexes as llama.cpp's llm_tokenizer_bpe spells them (llama-vocab.cpp, llama.cpp vendored
# in llama-cpp-python 0.3.36); onig (inside `tokenizers`) reads this syntax as llama.cpp means it.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

_PRE_DEFAULT = PreTokenizer(_DEFAULT)
_PRE_GPT2 = PreTokenizer((_GPT2,))
_PRE_LLAMA3 = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_PRE_LLAMA3_REGEX_ONLY = PreTokenizer((_LLAMA3,))
_PRE_QWEN2 = PreTokenizer((_QWEN2,))
_PRE_SMOLLM = PreTokenizer((r"\p{N}", _GPT2))  # every digit alone, then GPT-2's split

#: ``tokenizer.ggml.pre`` values supported for ``tokenizer.ggml.model = gpt2``, each mapped the
#: way llama.cpp maps it (several names share one regex set there). ``gpt2`` is accepted as a
#: spelling of llama.cpp's ``gpt-2``.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _PRE_DEFAULT,
    "gpt-2": _PRE_GPT2,
    "gpt2": _PRE_GPT2,
    "mpt": _PRE_GPT2,
    "olmo": _PRE_GPT2,
    "llama-bpe": _PRE_LLAMA3,
    "llama3": _PRE_LLAMA3,
    "llama-v3": _PRE_LLAMA3,
    "dbrx": _PRE_LLAMA3_REGEX_ONLY,
    "smaug-bpe": _PRE_LLAMA3_REGEX_ONLY,
    "qwen2": _PRE_QWEN2,
    "deepseek-r1-qwen": _PRE_QWEN2,
    "stablelm2": _PRE_QWEN2,
    "smollm": _PRE_SMOLLM,
    "starcoder": _PRE_SMOLLM,
    "refact": _PRE_SMOLLM,
    "codeshell": _PRE_SMOLLM,
}

# Token texts llama.cpp treats as end-of-generation (llama_vocab::impl::load, "special_eog_ids").
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
})
# Texts llama.cpp auto-detects as EOT / EOM / FIM tokens when the metadata does not name them;
# each found one is forced to CONTROL (so it is split out of text only with parse_special).
_EOT_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
})
_EOM_TEXTS = frozenset({"<|eom_id|>"})
_FIM_TEXTS = {
    "fim_pre": frozenset({"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>",
                          "<PRE>", "▁<PRE>", "<|code_prefix|>", "<|prefix|>"}),
    "fim_suf": frozenset({"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>",
                          "<SUF>", "▁<SUF>", "<|code_suffix|>", "<|suffix|>"}),
    "fim_mid": frozenset({"<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>",
                          "<MID>", "▁<MID>", "<|code_middle|>", "<|middle|>"}),
    "fim_pad": frozenset({"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"}),
    "fim_rep": frozenset({"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"}),
    "fim_sep": frozenset({"<|file_sep|>"}),
}
# gpt-oss chat markers llama.cpp always renders and always splits out (forced USER_DEFINED).
_ALWAYS_USER_DEFINED = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})
_NAMED_TEXTS = _EOG_TEXTS.union(_EOT_TEXTS, _EOM_TEXTS, _ALWAYS_USER_DEFINED, *_FIM_TEXTS.values())

_KEY = "tokenizer.ggml."


# --------------------------------------------------------------------------------------------
# Metadata reading
# --------------------------------------------------------------------------------------------


class _Meta:
    """Typed access to ``tokenizer.ggml.*`` keys; every error names the source and the key."""

    def __init__(self, metadata: Mapping[str, Any], source: str) -> None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping, not {type(metadata).__name__}")
        self.md = metadata
        self.source = source

    def error(self, key: str, problem: str) -> TokenizerError:
        return TokenizerError(f"{self.source}: {key}: {problem}")

    def _typed(self, key: str, ok: bool, expected: str) -> Any:
        if not ok:
            raise self.error(key, f"expected {expected}, got {type(self.md[key]).__name__} "
                                  f"{_short_repr(self.md[key])}")
        return self.md[key]

    def string(self, key: str, default: str | None = None, required: bool = False) -> str | None:
        if key not in self.md:
            if required:
                raise self.error(key, "missing")
            return default
        return self._typed(key, isinstance(self.md[key], str), "a string")

    def flag(self, key: str, default: bool) -> bool:
        if key not in self.md:
            return default
        return bool(self._typed(key, isinstance(self.md[key], (bool, np.bool_)), "a bool"))

    def integer(self, key: str) -> int | None:
        if key not in self.md:
            return None
        v = self.md[key]
        # bool is an int to Python, but an id stored as a bool is a malformed file.
        ok = isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))
        return int(self._typed(key, ok, "an integer"))

    def str_list(self, key: str, required: bool = True) -> list[str] | None:
        if key not in self.md:
            if required:
                raise self.error(key, "missing")
            return None
        v = self.md[key]
        ok = isinstance(v, (list, tuple)) and set(map(type, v)) <= {str}
        return list(self._typed(key, ok, "a list of strings"))

    def num_array(self, key: str, n: int, integer: bool) -> np.ndarray | None:
        """One number per token: int32 when ``integer`` (token types), else float32 (scores)."""
        if key not in self.md:
            return None
        v = self.md[key]
        arr = np.asarray(v) if isinstance(v, (list, tuple, np.ndarray)) else None
        kinds = ("i", "u") if integer else ("i", "u", "f")
        ok = arr is not None and arr.ndim == 1 and (arr.dtype.kind in kinds or arr.size == 0)
        self._typed(key, ok, "a list of integers" if integer else "a list of numbers")
        # llama.cpp refuses fewer entries than tokens; more would mean a misaligned file.
        if len(arr) != n:
            raise self.error(key, f"has {len(arr)} entries for {n} tokens")
        if integer and arr.size and (arr.min() < np.iinfo(np.int32).min
                                     or arr.max() > np.iinfo(np.int32).max):
            raise self.error(key, "entries do not fit int32")
        return arr.astype(np.int32 if integer else np.float32)

    def token_id(self, key: str, n_vocab: int, default: int | None) -> int | None:
        """``tokenizer.ggml.<name>_token_id``; llama.cpp's default when absent, None if unset."""
        value = self.integer(key)
        if value is None:
            # llama.cpp silently disables a default that is out of range for this vocabulary.
            return default if default is not None and 0 <= default < n_vocab else None
        if not 0 <= value < n_vocab:
            raise self.error(key, f"id {value} is out of range for a vocabulary of {n_vocab}")
        return value


def _short_repr(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _source_name(gguf_file: Any) -> str:
    path = getattr(gguf_file, "path", None)
    return str(path) if path is not None else "GGUF metadata"


# --------------------------------------------------------------------------------------------
# Chat templates: the renderer of Hugging Face transformers
# --------------------------------------------------------------------------------------------

# The special tokens transformers gives a template (its ``special_tokens_map``), with the key
# of each id here; the GGUF keys are tokenizer.ggml.{bos,eos,unknown,seperator,padding,
# mask}_token_id. transformers' cls_token has no GGUF key (gguf-py writes no id for it), so a
# template never sees it here.
_TEMPLATE_SPECIAL_TOKENS = (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unk"),
                            ("sep_token", "sep"), ("pad_token", "pad"), ("mask_token", "mask"))
# transformers' names for a message's reasoning; templates read the first.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# What transformers appends to a message continued by continue_final_message.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# transformers refuses older jinja2: chat templates are untrusted code and older sandboxes
# have known escapes.
_MIN_JINJA2 = (3, 1, 6)


def _template_key(name: str) -> str:
    return "tokenizer.chat_template" + ("" if name == "default" else "." + name)


def _strftime_now(format: str) -> str:
    """transformers' ``strftime_now``: the local time now, ``datetime.now().strftime``."""
    return datetime.now().strftime(format)


@lru_cache(maxsize=1)
def _chat_environment() -> Any:
    """The jinja environment of transformers' ``_compile_jinja_template`` (transformers 5.24,
    ``utils/chat_template_utils.py``), rebuilt here so that transformers is not a dependency:

    - ``ImmutableSandboxedEnvironment`` (templates are untrusted; lists and dicts passed in
      cannot be changed), ``trim_blocks=True``, ``lstrip_blocks=True``, no autoescape;
    - extensions: ``{% generation %} ... {% endgeneration %}`` (transformers'
      ``AssistantTracker``: renders its body, and records the body's character span while a
      tracker is active) and ``jinja2.ext.loopcontrols`` (``{% break %}``, ``{% continue %}``);
    - filter ``tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)``:
      ``json.dumps`` with those arguments, in that order (jinja's own escapes HTML and has
      other arguments);
    - globals ``raise_exception(message)``, ``strftime_now(format)``, ``dict`` (callable and
      ``dict.fromkeys`` only) and ``namespace`` (refusing attribute names that start with
      ``_``).
    """
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    version = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < _MIN_JINJA2:
        raise ImportError(f"chat templates need jinja2 >= 3.1.6 (older sandboxes have known "
                          f"escapes), found {jinja2.__version__}")

    class GenerationBlocks(jinja2.ext.Extension):
        # transformers' AssistantTracker, tag for tag.
        tags = {"generation"}

        def __init__(self, environment: Any) -> None:
            super().__init__(environment)
            environment.extend(activate_tracker=self.activate_tracker)
            self._tracking: ContextVar[Any] = ContextVar("generation_spans", default=None)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [],
                                          body).set_lineno(lineno)

        @jinja2.pass_eval_context
        def _generation_support(self, context: Any, caller: Any) -> str:
            rv = caller()
            tracking = self._tracking.get()
            if tracking is not None:
                # As transformers counts: the text yielded so far by Template.generate, so a
                # span is exact for blocks rendered at the top level of the output.
                blocks, spans = tracking
                start = len("".join(blocks))
                spans.append((start, start + len(rv)))
            return rv

        @contextmanager
        def activate_tracker(self, blocks: list[str], spans: list[tuple[int, int]]) -> Any:
            if self._tracking.get() is not None:
                raise ValueError("the generation-span tracker is already active")
            token = self._tracking.set((blocks, spans))
            try:
                yield
            finally:
                self._tracking.reset(token)

    def raise_exception(message: str) -> None:
        raise _RaisedByTemplate(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    class TemplateDict:
        # transformers' stand-in for dict: no attribute of the real type (dict.update could
        # change a dict through the sandbox) but calling it and fromkeys.
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # transformers' namespace: no attribute name starting with "_" (CPython internals).
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]  # jinja's signature trick: namespace(self=...) works
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a "
                    f"namespace, but got {name!r}. Please rename the attribute.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


@lru_cache(maxsize=32)
def _compile_chat_template(text: str) -> Any:
    """``text`` compiled in :func:`_chat_environment`; raises ``jinja2.TemplateSyntaxError``."""
    return _chat_environment().from_string(text)


class _RaisedByTemplate(Exception):
    """``raise_exception(message)`` called by a template (transformers raises a jinja2
    ``TemplateError``; here it becomes a :class:`ChatTemplateError` carrying the message)."""

    def __init__(self, message: Any) -> None:
        super().__init__(message)
        self.message = message


def _message_objects_to_dicts(value: Any) -> Any:
    """transformers' ``_message_objects_to_dicts``: mappings, dataclasses and pydantic models
    (``model_dump``) to dicts, recursively through lists and tuples; anything else as is."""
    if isinstance(value, Mapping):
        return {k: _message_objects_to_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_message_objects_to_dicts(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_message_objects_to_dicts(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _message_objects_to_dicts(getattr(value, f.name))
                for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _message_objects_to_dicts(value.model_dump())
    return value


def _plain_template_data(value: Any) -> Any:
    """transformers' ``_plain_template_data``: what a template sees, rebuilt from plain JSON
    types so that no object's methods reach the sandbox. Exact str/int/float/bool/None as
    they are; subclasses (enums, numpy float64) as the base type; mappings as dicts, lists
    and tuples as such; numpy scalars as Python numbers; dataclasses and pydantic models as
    dicts; anything else as the text ``<TypeName>``."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(k): _plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(v) for v in value)
    if isinstance(value, np.generic):
        return _plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_template_data(getattr(value, f.name))
                for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning_fields(chat: list[Any]) -> list[Any]:
    """transformers' ``_alias_reasoning_fields``: a message's reasoning (the first non-None of
    ``reasoning_content``, ``thinking``, ``reasoning``) copied to ``reasoning_content``, and to
    ``thinking`` unless the message has one (gpt-oss templates read ``thinking``)."""
    out = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in _REASONING_FIELDS
                              if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """A GGUF model's tokenizer: text <-> token ids as llama.cpp computes them.

    Build one with :func:`from_gguf` or :func:`from_metadata`. Token ids are Python ints.

    Attributes: ``kind`` ("bpe" or "spm"), ``pre`` (``tokenizer.ggml.pre``, BPE only),
    ``vocab_size``, ``tokens`` (list[str], the vocabulary as stored), ``token_types`` (int8
    ``[vocab_size]``, after llama.cpp's overrides), ``bos_id`` / ``eos_id`` / ``unk_id`` /
    ``pad_id`` (int or None), ``add_bos`` / ``add_eos`` / ``add_space_prefix`` (bool),
    ``eog_ids`` (frozenset of end-of-generation ids), ``chat_template`` (str or None: the
    default template, ``tokenizer.chat_template``), ``chat_templates`` (dict name -> text: the
    named ones, ``tokenizer.chat_template.<name>``, often empty).
    """

    def __init__(
        self,
        *,
        kind: str,
        tokens: list[str],
        token_to_id: dict[str, int],
        token_types: np.ndarray,
        scores: np.ndarray | None,
        merges: list[str] | None,
        pre: str | None,
        special_ids: Mapping[str, int | None],
        add_bos: bool,
        add_eos: bool,
        add_space_prefix: bool,
        eog_ids: Iterable[int],
        chat_template: str | None,
        source: str,
        chat_templates: Mapping[str, str] | None = None,
    ) -> None:
        self.kind = kind
        self.tokens = tokens
        self.token_types = token_types
        self.pre = pre
        self.vocab_size = len(tokens)
        self.bos_id = special_ids.get("bos")
        self.eos_id = special_ids.get("eos")
        self.unk_id = special_ids.get("unk")
        self.pad_id = special_ids.get("pad")
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.eog_ids = frozenset(eog_ids)
        self.chat_template = chat_template
        self.chat_templates = dict(chat_templates or {})
        self.source = source
        self._special_ids = dict(special_ids)
        self._token_to_id = token_to_id
        self._special_groups = self._group_special_tokens()
        if kind == "bpe":
            self._backend = _ByteLevelBPE(tokens, merges or [], PRE_TOKENIZERS[pre], token_to_id,
                                          source)
        else:
            self._backend = _SentencePieceBPE(tokens, token_types, scores, self.unk_id, source)

    def __repr__(self) -> str:
        what = f"bpe/{self.pre}" if self.kind == "bpe" else "spm"
        return (f"Tokenizer({what}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, add_bos={self.add_bos}, add_eos={self.add_eos})")

    # ---- encoding --------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``, as ``llama_tokenize(text, add_special, parse_special)``.

        ``add_special``: prepend BOS / append EOS where the metadata asks for them
        (``add_bos`` / ``add_eos``). ``parse_special``: text spelling a CONTROL token (such as
        ``<|im_start|>``) becomes that token; otherwise it is tokenized as ordinary text.
        USER_DEFINED tokens are always matched whole, as in llama.cpp.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not encodable as UTF-8 at character {e.start} "
                             f"({text[e.start]!r}: a lone surrogate)") from None
        fragments = self._split_special(text, parse_special)
        raw = [f for f in fragments if isinstance(f, str)]
        if self.kind == "spm":
            raw = self._spm_prefix_spaces(fragments)
        encoded = iter(self._backend.encode(raw))

        ids: list[int] = []
        if add_special and self.add_bos:
            ids.append(self.bos_id)
        for f in fragments:
            if isinstance(f, str):
                ids.extend(next(encoded))
            else:
                ids.append(f)
        if add_special and self.add_eos:
            ids.append(self.eos_id)
        return ids

    def _group_special_tokens(self) -> dict[str, list[tuple[int, str, bool]]]:
        """Special tokens for :meth:`_split_special`, grouped by their first 3 characters.

        Each entry is (id, text, is_control). A whole group is skipped when its key is absent
        from the text, which keeps the search cheap for vocabularies with thousands of special
        tokens (Gemma's ``<unused...>``).
        """
        special = np.flatnonzero(np.isin(self.token_types, _SPECIAL_TYPES)).tolist()
        groups: dict[str, list[tuple[int, str, bool]]] = {}
        for i in special:
            text = self.tokens[i]
            control = int(self.token_types[i]) in _CONTROL_TYPES
            groups.setdefault(text[:3], []).append((i, text, control))
        return groups

    def _split_special(self, text: str, parse_special: bool) -> list[str | int]:
        """``text`` cut into raw-text fragments (str) and special token ids (int).

        Mirrors llama.cpp's ``tokenizer_st_partition``: for each special token, longest first,
        every occurrence in every remaining raw fragment is cut out, left to right.
        """
        if not text:
            return []
        present = [
            (i, t)
            for key, group in self._special_groups.items() if key in text
            for i, t, control in group if (parse_special or not control) and t in text
        ]
        # llama.cpp tries them longest first, in UTF-8 bytes (its sort is unstable: ties here
        # go by id; they only matter for two equally long tokens that overlap in the text).
        present.sort(key=lambda it: (-len(it[1].encode()), it[0]))
        fragments: list[str | int] = [text]
        for token_id, token_text in present:
            cut: list[str | int] = []
            for f in fragments:
                if isinstance(f, int) or token_text not in f:
                    cut.append(f)
                    continue
                for k, part in enumerate(f.split(token_text)):
                    if k:
                        cut.append(token_id)
                    if part:
                        cut.append(part)
            fragments = cut
        return fragments

    def _spm_prefix_spaces(self, fragments: list[str | int]) -> list[str]:
        """Raw fragments with SentencePiece's dummy space, where llama.cpp adds it: before the
        first fragment and before each fragment that follows a special token."""
        out = []
        prev_special = True
        for f in fragments:
            if isinstance(f, str):
                out.append(" " + f if self.add_space_prefix and prev_special else f)
            prev_special = not isinstance(f, str)
        return out

    # ---- decoding --------------------------------------------------------------------------

    @cached_property
    def _piece_bytes(self) -> np.ndarray:
        """object ``[vocab_size]``: each token's bytes as llama.cpp's token_to_piece(special=True)
        renders them."""
        pieces = np.empty(self.vocab_size, dtype=object)
        pieces[:] = [self._backend.piece_bytes(t, k)
                     for t, k in zip(self.tokens, self.token_types.tolist())]
        return pieces

    @cached_property
    def _control_mask(self) -> np.ndarray:
        return np.isin(self.token_types, _CONTROL_TYPES)

    def _check_ids(self, ids: Iterable[int]) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in ("i", "u")):
            raise ValueError(f"ids must be a 1-D sequence of ints, got dtype {arr.dtype}, "
                             f"shape {arr.shape}")
        arr = arr.astype(np.int64)
        bad = np.flatnonzero((arr < 0) | (arr >= self.vocab_size))
        if bad.size:
            raise ValueError(f"ids[{bad[0]}] = {arr[bad[0]]} is out of range for a vocabulary "
                             f"of {self.vocab_size}")
        return arr

    def token_to_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for (special tokens: their text).

        A byte-level token can be part of a UTF-8 character, so stream decoders should join
        bytes (or feed an incremental UTF-8 decoder) rather than decode tokens one by one.
        """
        return self._piece_bytes[int(self._check_ids([token_id])[0])]

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        """The bytes of ``ids`` joined; see :meth:`decode`."""
        arr = self._check_ids(ids)
        if skip_special:
            arr = arr[~self._control_mask[arr]]
        data = b"".join(self._piece_bytes[arr])
        if self.add_space_prefix:
            data = self._strip_dummy_space(arr, data)
        return data

    def _strip_dummy_space(self, arr: np.ndarray, data: bytes) -> bytes:
        """Undo the space ``encode`` adds at the start of the text (SentencePiece models with
        ``add_space_prefix``): one leading space of the first token after any leading BOS."""
        k = 1 if arr.size and arr[0] == self.bos_id else 0
        if k >= arr.size or not self._piece_bytes[arr[k]].startswith(b" "):
            return data
        offset = len(self._piece_bytes[arr[0]]) if k else 0
        return data[:offset] + data[offset + 1:]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids`` (list or 1-D int array).

        Byte-level tokens are mapped back to bytes and SentencePiece ``▁`` to spaces; CONTROL
        and UNKNOWN tokens are rendered as their text unless ``skip_special``; USER_DEFINED
        tokens always are. Bytes that are not valid UTF-8 (such as a character cut off at the
        end) become U+FFFD. Unlike llama.cpp's ``llama_detokenize`` no spaces are "cleaned", so
        ``decode(encode(text, add_special=False)) == text`` for byte-level BPE.
        """
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def incremental_decoder(self) -> codecs.IncrementalDecoder:
        """A UTF-8 decoder for streaming: feed it ``token_to_bytes`` of each new token and it
        returns the text that is complete so far, holding back a partial character."""
        return codecs.getincrementaldecoder("utf-8")(errors="replace")

    # ---- vocabulary ------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        """The id of vocabulary entry ``token`` (as stored: ``Ġ``/``▁`` spelling), or None."""
        return self._token_to_id.get(token)

    def is_special(self, token_id: int) -> bool:
        """True for CONTROL, USER_DEFINED and UNKNOWN tokens: those llama.cpp matches whole in
        text before merging (CONTROL and UNKNOWN only with ``parse_special``)."""
        return int(self.token_types[self._check_ids([token_id])[0]]) in _SPECIAL_TYPES

    def is_control(self, token_id: int) -> bool:
        """True for CONTROL and UNKNOWN tokens: those ``decode(skip_special=True)`` drops."""
        return bool(self._control_mask[self._check_ids([token_id])[0]])

    def is_eog(self, token_id: int) -> bool:
        """True when ``token_id`` ends generation (llama.cpp's ``llama_vocab_is_eog``)."""
        return int(token_id) in self.eog_ids

    # ---- chat templates --------------------------------------------------------------------

    def _chat_template_text(self, chat_template: str | None, tools: Any) -> tuple[str, str]:
        """(template text, its name for messages), chosen as transformers'
        ``get_chat_template`` chooses: with named templates, ``chat_template`` may name one; with
        none named, ``tools`` picks ``tool_use`` if the model has it, else ``default``. A
        ``chat_template`` that is not a name is the template text itself."""
        if self.chat_templates:
            named = dict(self.chat_templates)
            if self.chat_template is not None:
                named["default"] = self.chat_template
            if chat_template is not None and chat_template in named:
                return named[chat_template], _template_key(chat_template)
            if chat_template is None:
                if tools is not None and "tool_use" in named:
                    return named["tool_use"], _template_key("tool_use")
                if "default" in named:
                    return named["default"], _template_key("default")
                raise ChatTemplateError(
                    f"{self.source}: the model has several chat templates and no default; pass "
                    f"chat_template=NAME, one of {sorted(named)}")
        elif chat_template is None:
            if self.chat_template is None:
                raise ChatTemplateError(f"{self.source}: the model has no chat template "
                                        f"(metadata key tokenizer.chat_template is absent)")
            return self.chat_template, _template_key("default")
        if not isinstance(chat_template, str):
            raise TypeError(f"chat_template must be a template name or text, not "
                            f"{type(chat_template).__name__}")
        return chat_template, "passed as chat_template"

    def _compile_chat_template(self, text: str, name: str) -> Any:
        import jinja2

        try:
            return _compile_chat_template(text)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.source}: {name} does not compile: {e}") from None

    def chat_template_special_tokens(self) -> dict[str, str]:
        """The special tokens a chat template sees, as text: transformers'
        ``special_tokens_map`` (``bos_token``, ``eos_token``, ``unk_token``, ``sep_token``,
        ``pad_token``, ``mask_token``), each only when the vocabulary has that id; absent ones
        are undefined in the template, as in transformers. (transformers' ``cls_token`` has no
        GGUF key, so it is never given.)"""
        return {name: self.tokens[self._special_ids[key]]
                for name, key in _TEMPLATE_SPECIAL_TOKENS
                if self._special_ids.get(key) is not None}

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        continue_final_message: bool | str = False,
        return_generation_spans: bool = False,
        **kwargs: Any,
    ) -> str | tuple[str, list[tuple[int, int]]]:
        """``messages`` rendered with the model's chat template, the text transformers'
        ``tokenizer.apply_chat_template(messages, tokenize=False, ...)`` gives (transformers
        5.24, ``tokenization_utils_base.py`` and ``utils/chat_template_utils.py``); encode the
        result with ``parse_special=True``.

        What transformers does and this does too, in its order: the template is chosen by
        ``chat_template`` / ``tools`` among the model's named templates
        (``tokenizer.chat_template.<name>``); ``messages`` (mappings, dataclasses or pydantic
        models, each message's keys whose value is None dropped) and ``tools``, ``documents``
        and ``kwargs`` are rebuilt from plain JSON types (tuples kept, numpy scalars as Python
        numbers, any other object as the text ``<TypeName>``); a message's reasoning given as
        ``reasoning_content``, ``thinking`` or ``reasoning`` is copied under
        ``reasoning_content`` and (unless present) ``thinking``; the template sees
        ``messages``, ``tools`` and ``documents`` (None when not given),
        ``add_generation_prompt``, the special tokens (:meth:`chat_template_special_tokens`)
        and ``kwargs`` (which override them). ``continue_final_message`` (True, or the name of
        the final message's field to continue) leaves the final message open. The jinja
        environment is transformers' (see ``docs/tokenizers.md``): ``{% generation %}``,
        loop controls, ``trim_blocks`` / ``lstrip_blocks``, its ``tojson``, ``raise_exception``,
        ``strftime_now``, ``dict`` and ``namespace``, an immutable sandbox.

        ``add_generation_prompt`` defaults to True (False with ``continue_final_message``):
        quantref renders prompts to generate from; transformers' default is False.
        ``return_generation_spans``: also return the ``(start, end)`` character spans of the
        ``{% generation %}`` blocks in the text, as transformers' ``render_jinja_template``
        returns them for ``return_assistant_tokens_mask``.

        Raises :class:`ChatTemplateError` (a ValueError) when the model has no template, the
        template does not compile, raises or fails to render (the message says which and
        why), or ``continue_final_message`` cannot be applied; ``ValueError`` for an empty
        conversation, a tool that is not a JSON schema (a Python function is not converted
        here, unlike transformers) or incompatible options; ``TypeError`` for a message or
        document that is not a mapping.
        """
        import jinja2

        text, name = self._chat_template_text(chat_template, tools)
        template = self._compile_chat_template(text, name)

        messages = getattr(messages, "messages", messages)  # transformers' Conversation objects
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
            raise TypeError(f"messages must be a list of message mappings, not "
                            f"{type(messages).__name__}")
        if len(messages) == 0:
            raise ValueError("cannot apply a chat template to an empty conversation")
        chat = []
        for k, message in enumerate(messages):
            message = _message_objects_to_dicts(message)
            if not isinstance(message, dict):
                raise TypeError(f"messages[{k}] must be a mapping, a dataclass or a pydantic "
                                f"model, got {message!r}")
            # transformers drops None values: templates test for a key, not for None.
            chat.append({key: v for key, v in message.items() if v is not None})
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not "
                             "compatible: one continues the final message, the other starts "
                             "a new one")
        if continue_final_message and return_generation_spans:
            raise ValueError("continue_final_message is not compatible with "
                             "return_generation_spans")
        if tools is not None:
            if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
                raise ValueError(f"tools must be a list of JSON schemas, not "
                                 f"{type(tools).__name__}")
            for k, tool in enumerate(tools):
                if not isinstance(tool, Mapping):
                    why = (" (quantref does not turn Python functions into schemas as "
                           "transformers' get_json_schema does)" if callable(tool) else "")
                    raise ValueError(f"tools[{k}] must be a JSON schema (a mapping), got "
                                     f"{type(tool).__name__}{why}")
        if documents is not None:
            for k, document in enumerate(documents):
                if not isinstance(document, Mapping):
                    raise TypeError(f"documents[{k}] must be a mapping (with 'title' and "
                                    f"'text'), got {type(document).__name__}")
        context = _plain_template_data({**self.chat_template_special_tokens(), **kwargs})
        chat = _alias_reasoning_fields(_plain_template_data(chat))

        final_message = None
        if continue_final_message:
            final_message = self._mark_final_message(chat, continue_final_message, text)
        render_args = dict(messages=chat, tools=_plain_template_data(tools),
                           documents=_plain_template_data(documents),
                           add_generation_prompt=add_generation_prompt, **context)
        spans: list[tuple[int, int]] = []
        try:
            if return_generation_spans:
                blocks: list[str] = []
                with template.environment.activate_tracker(blocks, spans):
                    for block in template.generate(**render_args):
                        blocks.append(block)
                rendered = "".join(blocks)
            else:
                rendered = template.render(**render_args)
        except _RaisedByTemplate as e:
            raise ChatTemplateError(f"{self.source}: chat template: {e.message}") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.source}: chat template failed to render: "
                                    f"{type(e).__name__}: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            # Python errors from inside the template (e.g. str + int); transformers lets these
            # propagate as they are.
            raise ChatTemplateError(f"{self.source}: chat template failed to render: "
                                    f"{type(e).__name__}: {e}") from e
        if final_message is not None:
            rendered = self._cut_at_final_message(rendered, final_message)
        return (rendered, spans) if return_generation_spans else rendered

    def _mark_final_message(self, chat: list[Any], field: bool | str, template_text: str) -> str:
        """transformers' ``continue_final_message``: append a tag to the final message's field
        (``content`` for True) so that the rendering can be cut there; returns the field's
        text as it was."""
        field = field if isinstance(field, str) else "content"
        final = chat[-1]
        if not isinstance(final, dict) or (final_message := final.get(field)) is None:
            raise ChatTemplateError(f"continue_final_message is set but the final message has "
                                    f"no {field!r} to continue")
        fields = [field]
        if field in _REASONING_FIELDS:
            # reasoning is copied under several names: tag each copy, the template reads one
            fields = [f for f in _REASONING_FIELDS if final.get(f) == final_message]
        if not any(f in template_text for f in fields):
            raise ChatTemplateError(f"continue_final_message is set to {field!r} but the chat "
                                    f"template does not read that field")
        if isinstance(final_message, (list, tuple)):
            for block in reversed(final_message):
                if "text" in block:  # the last text block is the one continued
                    final_message = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise ChatTemplateError("continue_final_message is set but the final message "
                                        "has no text block to continue")
        else:
            for f in fields:
                final[f] = final[f] + _CONTINUE_TAG
        return final_message

    def _cut_at_final_message(self, rendered: str, final_message: str) -> str:
        tag = _CONTINUE_TAG.strip()
        if final_message.strip() not in rendered or tag not in rendered:
            raise ChatTemplateError(
                f"{self.source}: continue_final_message is set but the final message does not "
                f"appear in the rendered chat (the template drops or changes part of it)")
        at = rendered.rindex(tag)
        if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            return rendered[:at]  # the template kept the spacing
        return rendered[:at].rstrip()  # it trimmed trailing space: cut the space before too


# --------------------------------------------------------------------------------------------
# Backends: the merge step, per vocabulary type
# --------------------------------------------------------------------------------------------


_UNK_SENTINEL = "\0<unknown byte>"


class _ByteLevelBPE:
    """GPT-2 style byte-level BPE through Hugging Face ``tokenizers``."""

    def __init__(self, tokens: list[str], merges: list[str], pre: PreTokenizer,
                 token_to_id: dict[str, int], source: str) -> None:
        from tokenizers import Regex
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import pre_tokenizers
        from tokenizers.models import BPE

        pairs = []
        for k, merge in enumerate(merges):
            # llama.cpp splits at the first space after the first character.
            cut = merge.find(" ", 1)
            left, right = merge[:cut], merge[cut + 1:]
            if cut < 0 or left not in token_to_id or right not in token_to_id \
                    or left + right not in token_to_id:
                raise TokenizerError(
                    f"{source}: {_KEY}merges[{k}] = {merge!r}: not two vocabulary tokens "
                    f"separated by a space whose concatenation is also a token")
            pairs.append((left, right))
        # A byte missing from the vocabulary is dropped by llama.cpp, but only after the merges:
        # it still separates its neighbours. `tokenizers` drops such a character before merging
        # unless there is an unknown token, so one is added, spelled so that no text produces
        # it (no byte maps to "\0"), with an id past the vocabulary, and removed from results.
        self._unk = len(tokens)
        vocab = {**token_to_id, _UNK_SENTINEL: self._unk}
        model = BPE(vocab=vocab, merges=pairs, unk_token=_UNK_SENTINEL,
                    ignore_merges=pre.ignore_merges, fuse_unk=False, byte_fallback=False)
        self._hf = HFTokenizer(model)
        self._hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    def encode(self, fragments: list[str]) -> list[list[int]]:
        # One call per fragment (not encode_batch): no worker threads, so no fork warnings.
        out = [self._hf.encode(f, add_special_tokens=False).ids for f in fragments]
        return [[i for i in ids if i != self._unk] if self._unk in ids else ids for ids in out]

    @staticmethod
    def piece_bytes(text: str, token_type: int) -> bytes:
        if token_type == TOKEN_NORMAL:
            if _BYTE_ALPHABET.issuperset(text):
                return text.translate(_UNICODE_TO_BYTE).encode("latin-1")
            # A character outside GPT-2's byte alphabet stays as its UTF-8 (llama.cpp writes
            # an "[UNK_BYTE_0x..]" marker instead).
            return b"".join(bytes([_UNICODE_TO_BYTE[ord(c)]]) if c in _BYTE_ALPHABET
                            else c.encode() for c in text)
        if token_type == TOKEN_BYTE:
            return _byte_token_value(text)
        if token_type in _SPECIAL_TYPES:
            return text.encode()
        return b""  # UNUSED / UNDEFINED: llama.cpp renders nothing


class _SentencePieceBPE:
    """SentencePiece BPE through ``sentencepiece``, from a ModelProto built from the metadata."""

    def __init__(self, tokens: list[str], token_types: np.ndarray, scores: np.ndarray | None,
                 unk_id: int | None, source: str) -> None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        n = len(tokens)
        if unk_id is None:
            raise TokenizerError(f"{source}: {_KEY}unknown_token_id: a SentencePiece "
                                 f"vocabulary needs an unknown token")
        byte_ids = np.flatnonzero(token_types == TOKEN_BYTE)
        # from_metadata checked that each is spelled <0xXX>: 256 of them are all the bytes.
        byte_fallback = len(byte_ids) == 256

        # llama.cpp merges any two symbols whose concatenation is in the vocabulary, whatever
        # its type, scored by the token's score. SentencePiece gives CONTROL, USER_DEFINED and
        # UNUSED pieces special treatment, so every piece is NORMAL to it except the one
        # UNKNOWN piece and the BYTE pieces it needs for byte fallback (special-token text
        # never reaches it: Tokenizer._split_special cuts it out first, as llama.cpp does).
        piece_type = np.full(n, pb.ModelProto.SentencePiece.NORMAL, dtype=np.int32)
        if byte_fallback:
            piece_type[byte_ids] = pb.ModelProto.SentencePiece.BYTE
        piece_type[unk_id] = pb.ModelProto.SentencePiece.UNKNOWN
        score = scores if scores is not None else np.zeros(n, dtype=np.float32)

        proto = pb.ModelProto()
        proto.trainer_spec.model_type = pb.TrainerSpec.BPE
        proto.trainer_spec.vocab_size = n
        proto.trainer_spec.byte_fallback = byte_fallback
        proto.trainer_spec.unk_id = unk_id
        proto.trainer_spec.bos_id = -1
        proto.trainer_spec.eos_id = -1
        proto.trainer_spec.pad_id = -1
        # Identity normalization: encode() escapes spaces itself and adds the dummy prefix per
        # fragment, as llama.cpp does; SentencePiece must not touch the text.
        proto.normalizer_spec.name = "identity"
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        proto.normalizer_spec.escape_whitespaces = False
        piece = pb.ModelProto.SentencePiece
        proto.pieces.extend(piece(piece=t, score=float(s), type=int(k))
                            for t, s, k in zip(tokens, score.tolist(), piece_type.tolist()))
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto.SerializeToString())
        except RuntimeError as e:
            raise TokenizerError(f"{source}: {_KEY}tokens: sentencepiece refused the "
                                 f"vocabulary: {e}") from None

    def encode(self, fragments: list[str]) -> list[list[int]]:
        if not fragments:
            return []
        escaped = [f.replace(" ", _SPM_SPACE) for f in fragments]
        return self._sp.encode(escaped, out_type=int)

    @staticmethod
    def piece_bytes(text: str, token_type: int) -> bytes:
        if token_type == TOKEN_NORMAL:
            return text.replace(_SPM_SPACE, " ").encode()
        if token_type == TOKEN_BYTE:
            return _byte_token_value(text)
        if token_type in _SPECIAL_TYPES:
            return text.encode()
        return b""  # UNUSED / UNDEFINED: llama.cpp renders nothing


def _byte_token_value(text: str) -> bytes:
    """The byte a ``<0xXX>`` token stands for (from_metadata checked the spelling)."""
    return bytes([int(text[3:5], 16)])


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


# --------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------

_SUPPORTED_MODELS = ("gpt2", "llama")


def from_gguf(gguf_file: Any) -> Tokenizer:
    """The tokenizer of a GGUF file: anything with a ``.metadata`` mapping (``GGUFFile``).

    The tokenizer copies what it needs, so the file may be closed afterwards.
    """
    metadata = getattr(gguf_file, "metadata", None)
    if not isinstance(metadata, Mapping):
        raise TypeError(f"from_gguf needs an object with a .metadata mapping (a GGUFFile), "
                        f"not {type(gguf_file).__name__}")
    return from_metadata(metadata, source=_source_name(gguf_file))


def from_metadata(metadata: Mapping[str, Any], source: str = "GGUF metadata") -> Tokenizer:
    """A :class:`Tokenizer` from GGUF metadata (``tokenizer.ggml.*`` keys as Python values).

    ``source`` (a file name) prefixes error messages. Raises :class:`TokenizerError` for
    missing or malformed keys and :class:`UnsupportedTokenizerError` for a vocabulary type or
    pre-tokenizer this module does not implement, naming the supported ones.
    """
    meta = _Meta(metadata, source)
    model = meta.string(_KEY + "model", required=True)
    if model not in _SUPPORTED_MODELS:
        raise UnsupportedTokenizerError(
            f"{source}: {_KEY}model = {model!r} is not supported; supported: "
            f"{', '.join(_SUPPORTED_MODELS)} (byte-level BPE, SentencePiece)")
    kind = "bpe" if model == "gpt2" else "spm"

    tokens = meta.str_list(_KEY + "tokens")
    n = len(tokens)
    if n == 0:
        raise meta.error(_KEY + "tokens", "empty vocabulary")
    # llama.cpp renames empty tokens so that every token has a distinct, non-empty text.
    if "" in tokens:
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    token_to_id = {t: i for i, t in enumerate(tokens)}
    if len(token_to_id) != n:
        first = next(i for i, t in enumerate(tokens) if token_to_id[t] != i)
        t = tokens[first]
        raise meta.error(_KEY + "tokens", f"token {t!r} appears twice (ids {first} and "
                                          f"{token_to_id[t]})")

    types = meta.num_array(_KEY + "token_type", n, integer=True)
    if types is None:
        types = np.full(n, TOKEN_NORMAL, dtype=np.int32)
    bad = np.flatnonzero((types < TOKEN_UNDEFINED) | (types > TOKEN_BYTE))
    if bad.size:
        raise meta.error(_KEY + "token_type", f"entry {bad[0]} = {types[bad[0]]} is not a token "
                                              f"type (0..6)")
    types = types.astype(np.int8)
    for i in np.flatnonzero(types == TOKEN_BYTE).tolist():
        if not _BYTE_TOKEN.fullmatch(tokens[i]):
            raise meta.error(_KEY + "tokens", f"tokens[{i}] = {tokens[i]!r} has type BYTE but "
                                              f"is not spelled <0xXX>")
    scores = meta.num_array(_KEY + "scores", n, integer=False)

    pre = None
    merges = None
    if kind == "bpe":
        pre = meta.string(_KEY + "pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise UnsupportedTokenizerError(
                f"{source}: {_KEY}pre = {pre!r} is not a supported pre-tokenizer; supported: "
                f"{', '.join(sorted(PRE_TOKENIZERS))}")
        merges = meta.str_list(_KEY + "merges")

    # llama.cpp's defaults when a key is absent: SentencePiece ids 1/2/0 and BOS added;
    # byte-level BPE ids 11/11 (GPT-2's convention there) and BOS per pre-tokenizer.
    if kind == "spm":
        defaults = {"bos": 1, "eos": 2, "unk": 0}
        add_bos_default, add_space_prefix_default = True, True
    else:
        defaults = {"bos": 11, "eos": 11}
        add_bos_default, add_space_prefix_default = PRE_TOKENIZERS[pre].add_bos, False
    names = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding", "eot": "eot",
             "eom": "eom", "sep": "seperator", "mask": "mask",  # gguf's spelling
             **{f: f for f in _FIM_TEXTS}}
    ids = {name: meta.token_id(f"{_KEY}{key}_token_id", n, defaults.get(name))
           for name, key in names.items()}

    add_bos = meta.flag(_KEY + "add_bos_token", add_bos_default)
    add_eos = meta.flag(_KEY + "add_eos_token", False)
    add_space_prefix = meta.flag(_KEY + "add_space_prefix", add_space_prefix_default)
    if kind == "bpe":
        add_space_prefix = False  # llama.cpp: only SentencePiece vocabularies get a dummy space
    for flag, value, name in ((add_bos, ids["bos"], "bos"), (add_eos, ids["eos"], "eos")):
        if flag and value is None:
            raise meta.error(f"{_KEY}add_{name}_token", f"is true but the vocabulary has no "
                                                        f"{name} token")

    types, eog = _llama_cpp_special_tokens(token_to_id, types, ids)
    chat_template = meta.string("tokenizer.chat_template")
    chat_templates = _named_chat_templates(meta)
    return Tokenizer(kind=kind, tokens=tokens, token_to_id=token_to_id, token_types=types,
                     scores=scores, merges=merges, pre=pre, special_ids=ids,
                     add_bos=add_bos, add_eos=add_eos,
                     add_space_prefix=add_space_prefix, eog_ids=eog, chat_template=chat_template,
                     chat_templates=chat_templates, source=source)


def _named_chat_templates(meta: _Meta) -> dict[str, str]:
    """The named chat templates: gguf-py writes each ``{name, template}`` of a Hugging Face
    ``chat_template`` list other than ``default`` as ``tokenizer.chat_template.<name>`` and
    lists the names in ``tokenizer.chat_templates``; llama.cpp looks them up by key."""
    prefix = "tokenizer.chat_template."
    names = meta.str_list("tokenizer.chat_templates", required=False) or []
    names += [k[len(prefix):] for k in meta.md if isinstance(k, str) and k.startswith(prefix)]
    out = {}
    for name in names:
        text = meta.string(prefix + name)
        if text is None:
            raise meta.error("tokenizer.chat_templates", f"names {name!r} but {prefix}{name} "
                                                         f"is absent")
        out[name] = text
    return out


def _llama_cpp_special_tokens(token_to_id: Mapping[str, int], types: np.ndarray,
                              ids: dict[str, int | None]) -> tuple[np.ndarray, set[int]]:
    """llama.cpp's token-text heuristics: EOT/EOM/FIM tokens found by their text when the
    metadata does not name them, end-of-generation ids, and the type overrides that go with
    them. Returns (token types after overrides, end-of-generation ids); fills ``ids``."""
    types = types.copy()
    found = {t: token_to_id[t] for t in _NAMED_TEXTS if t in token_to_id}
    forced_control: set[int] = set()

    def detect(name: str, texts: frozenset[str]) -> None:
        if ids[name] is None:
            # llama.cpp takes the first match in hash-map order; the lowest id here.
            matches = sorted(i for t, i in found.items() if t in texts)
            if matches:
                ids[name] = matches[0]
                forced_control.add(matches[0])

    detect("eot", _EOT_TEXTS)
    detect("eom", _EOM_TEXTS)
    for name, texts in _FIM_TEXTS.items():
        detect(name, texts)

    eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
    eog_by_text = {i for t, i in found.items() if t in _EOG_TEXTS}
    eog |= eog_by_text
    forced_control |= eog_by_text
    eog |= {ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None}

    # A token forced to CONTROL keeps other attributes in llama.cpp (attr |= CONTROL); a
    # NORMAL token becoming NORMAL|CONTROL behaves as CONTROL everywhere that matters here.
    for i in forced_control:
        if types[i] not in (TOKEN_CONTROL,):
            types[i] = TOKEN_CONTROL
    for t, i in found.items():
        if t in _ALWAYS_USER_DEFINED:
            types[i] = TOKEN_USER_DEFINED
    return types, eog
