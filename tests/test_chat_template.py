"""Chat templates render what Hugging Face transformers renders.

``tests/data/chat_template_golden.json`` holds what transformers 5.24.0 (jinja2 3.1.6) gave
for each case: the environment it configures (``{% generation %}``, loop controls,
trim/lstrip blocks, its ``tojson``, ``raise_exception``, ``strftime_now``, ``dict``,
``namespace``, the immutable sandbox), what its ``apply_chat_template`` passes in (tools,
documents, special tokens, None-valued keys dropped, reasoning aliases, plain data,
``continue_final_message``, named templates), and 14 real templates as GGUF files carry them
(SmolLM2, SmolLM3, Llama 3.1, Llama 3.2, Qwen2.5, Qwen3, Gemma 3, Phi-4-reasoning, Phi-4-mini,
DeepSeek-R1, Granite 3.3, Mistral Small 3.2, LFM2.5, gpt-oss). ``tests/data/make_chat_template_golden.py`` made it (transformers is
not a quantref dependency). Each case's template goes through a real GGUF file here: written
with gguf-py's ``GGUFWriter`` (``add_chat_template``), read with ``quantref.gguf``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import gguf as gguf_py
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantref import gguf, testing
from quantref import tokenizer as tokenizer_module
from quantref.tokenizer import ChatTemplateError, Tokenizer, from_gguf

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = json.loads((DATA / "chat_template_golden.json").read_text(encoding="utf-8"))
CASES = {c["id"]: c for c in GOLDEN["cases"]}

_spec = importlib.util.spec_from_file_location("make_chat_template_golden",
                                               DATA / "make_chat_template_golden.py")
maker = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = maker  # dataclasses look their module up there
_spec.loader.exec_module(maker)  # only its input decoder and types; it imports transformers lazily

# transformers' jinja errors, which quantref raises as ChatTemplateError with the same message.
JINJA_ERRORS = {"TemplateSyntaxError", "TemplateError", "UndefinedError", "SecurityError"}
# Where quantref deliberately differs in the type of error (the message is still carried):
# a Python error inside a template (transformers lets it escape as it is) is a ChatTemplateError
# naming the source, so that every failure of a template is one type.
DELIBERATE = {"env/python_error_in_template": ChatTemplateError}

_SETTERS = {"bos_token": "add_bos_token_id", "eos_token": "add_eos_token_id",
            "unk_token": "add_unk_token_id", "sep_token": "add_sep_token_id",
            "pad_token": "add_pad_token_id", "mask_token": "add_mask_token_id"}


class FrozenClock(datetime):
    """The clock the golden file was rendered with (transformers' strftime_now read it)."""

    @classmethod
    def now(cls, tz: Any = None) -> datetime:
        return datetime.fromisoformat(GOLDEN["frozen_now"])


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "datetime", FrozenClock)


def write_gguf(path: Path, template: str | dict[str, str], specials: dict[str, str]) -> Path:
    """A GGUF holding quantref.testing's tiny byte-level vocabulary plus the special tokens
    (CONTROL tokens, appended when the vocabulary lacks them) and the chat template(s)."""
    tokens, types = list(testing.TOKENS), list(testing.TOKEN_TYPES)
    for text in specials.values():
        if text not in tokens:
            tokens.append(text)
            types.append(testing.TOKEN_TYPE_CONTROL)
    w = gguf_py.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(list(testing.MERGES))
    for name, text in specials.items():
        getattr(w, _SETTERS[name])(tokens.index(text))
    if isinstance(template, dict):  # Hugging Face's list of named templates, as convert writes it
        w.add_chat_template([{"name": k, "template": v} for k, v in template.items()])
    else:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_tokenizers: dict[str, Tokenizer] = {}


def tokenizer_for(case: dict, tmp_dir: Path) -> Tokenizer:
    if "template" in case:
        template: Any = GOLDEN["templates"][case["template"]]["text"]
    else:
        template = case.get("inline", case.get("named"))
    key = json.dumps([template, case["special_tokens"]], sort_keys=True)
    if key not in _tokenizers:
        path = write_gguf(tmp_dir / f"t{len(_tokenizers)}.gguf", template,
                          case["special_tokens"])
        with gguf.read(path) as gf:
            _tokenizers[key] = from_gguf(gf)
    return _tokenizers[key]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chat_templates")


def check(tok: Tokenizer, case: dict) -> None:
    messages, call = maker.decode(case["messages"]), maker.decode(case["call"])
    expected = case["expected"]
    if "error" in expected:
        kind = expected["error"]
        want = DELIBERATE.get(case["id"]) or (
            ChatTemplateError if kind in JINJA_ERRORS else {"ValueError": ValueError,
                                                            "TypeError": TypeError}[kind])
        with pytest.raises(want) as info:
            tok.apply_chat_template(messages, **call)
        if kind in JINJA_ERRORS or case["id"] in DELIBERATE:
            # jinja's (or the template's own) message, word for word, after quantref's prefix
            assert expected["message"] in str(info.value)
        return
    assert tok.apply_chat_template(messages, **call) == expected["text"]
    if case.get("spans"):
        text, spans = tok.apply_chat_template(messages, return_generation_spans=True, **call)
        assert text == expected["text"]
        assert [list(s) for s in spans] == expected["spans"]


def test_golden_file_covers_the_kind():
    # Every extension and setting transformers' renderer adds has a case, with a real result.
    ids = set(CASES)
    for needed in ("trim_blocks", "lstrip_blocks", "generation", "break_continue",
                   "tojson_default", "tojson_positional_is_ensure_ascii", "raise_exception",
                   "strftime_now", "dict_global", "namespace", "namespace_underscore_set",
                   "sandbox_immutable_list", "tools_documents_none", "special_tokens",
                   "none_values_dropped", "reasoning_aliases", "plain_data",
                   "continue_final_message"):
        assert f"env/{needed}" in ids
    families = {c["template"] for c in GOLDEN["cases"] if "template" in c}
    assert len(families) >= 14
    with_generation = [n for n, t in GOLDEN["templates"].items() if "{% generation" in
                       t["text"] or "{%- generation" in t["text"]]
    assert sorted(with_generation) == ["lfm2.5", "phi4-reasoning"]
    spans = [c for c in GOLDEN["cases"] if c["expected"].get("spans")]
    assert len(spans) >= 8 and all(s[0] <= s[1] for c in spans for s in c["expected"]["spans"])


@pytest.mark.parametrize("case_id", [c for c in CASES if c.startswith(("env/", "named/"))])
def test_renderer_matches_transformers(case_id, gguf_dir):
    case = CASES[case_id]
    check(tokenizer_for(case, gguf_dir), case)


@pytest.mark.parametrize("case_id", [c for c in CASES if not c.startswith(("env/", "named/"))])
def test_real_template_matches_transformers(case_id, gguf_dir):
    case = CASES[case_id]
    check(tokenizer_for(case, gguf_dir), case)


def test_generation_spans_cover_the_assistant_turns(gguf_dir):
    # Independent of the golden numbers: each span is exactly an assistant turn's body.
    case = CASES["phi4-reasoning/multi-turn-done"]
    tok = tokenizer_for(case, gguf_dir)
    text, spans = tok.apply_chat_template(maker.decode(case["messages"]),
                                          add_generation_prompt=False,
                                          return_generation_spans=True)
    assert [text[a:b] for a, b in spans] == ["4.<|im_end|>",
                                             "6, et ça ne coûte rien.<|im_end|>"]


def test_named_templates_are_read_from_gguf(gguf_dir):
    case = CASES["named/default"]
    tok = tokenizer_for(case, gguf_dir)
    assert tok.chat_template == case["named"]["default"]
    assert tok.chat_templates == {k: v for k, v in case["named"].items() if k != "default"}


def test_named_template_listed_but_absent_is_a_clear_error(gguf_dir):
    case = CASES["named/default"]
    tok_path = next(gguf_dir.glob("*.gguf"))
    with gguf.read(tok_path) as gf:
        md = dict(gf.metadata)
    md["tokenizer.chat_templates"] = ["tool_use", "missing"]
    md["tokenizer.chat_template.tool_use"] = case["named"]["tool_use"]
    with pytest.raises(tokenizer_module.TokenizerError,
                       match=r"tokenizer.chat_templates: names 'missing' but "
                             r"tokenizer.chat_template.missing is absent"):
        tokenizer_module.from_metadata(md)


def test_a_python_function_as_tool_is_refused_clearly(gguf_dir):
    tok = tokenizer_for(CASES["env/tools_documents_none"], gguf_dir)

    def get_weather(city: str) -> str:
        """Get the weather."""
        return city

    with pytest.raises(ValueError, match="does not turn Python functions into schemas"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[get_weather])


def test_generation_prompt_default_and_bad_combinations(gguf_dir):
    tok = tokenizer_for(CASES["env/tools_documents_none"], gguf_dir)
    msgs = [{"role": "user", "content": "x"}]
    # quantref renders prompts to generate from: True by default (transformers: False) ...
    assert tok.apply_chat_template(msgs).endswith(" True")
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).endswith(" False")
    # ... and False by default when continuing the final message.
    cont = tokenizer_for(CASES["env/continue_final_message"], gguf_dir)
    assert cont.apply_chat_template(msgs, continue_final_message=True) == "<user>x"
    with pytest.raises(ValueError, match="not compatible with return_generation_spans"):
        cont.apply_chat_template(msgs, continue_final_message=True,
                                 return_generation_spans=True)


# Text without surrogates (not encodable), and without the Phi/ChatML markers themselves.
_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=30).filter(
    lambda t: "<|im_" not in t)
_SETTINGS = settings(max_examples=60, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(contents=st.lists(_TEXT, min_size=1, max_size=6))
def test_generation_spans_are_the_assistant_bodies(contents, gguf_dir):
    # Phi-4-reasoning wraps each assistant body and its <|im_end|> in {% generation %}: the
    # spans must pick exactly those, in order, whatever the text.
    tok = tokenizer_for(CASES["phi4-reasoning/user"], gguf_dir)
    roles = ["user", "assistant"] * len(contents)
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents)]
    text, spans = tok.apply_chat_template(messages, add_generation_prompt=False,
                                          return_generation_spans=True)
    assert [text[a:b] for a, b in spans] == [m["content"] + "<|im_end|>" for m in messages
                                             if m["role"] == "assistant"]
    assert text == tok.apply_chat_template(messages, add_generation_prompt=False)


@_SETTINGS
@given(history=st.lists(_TEXT, max_size=4), partial=_TEXT.filter(lambda t: t.strip() != ""))
def test_continue_final_message_is_a_prefix(history, partial, gguf_dir):
    # Continuing the final message renders the chat up to that message's text, open-ended: a
    # prefix of the closed rendering, ending with the text (trailing spaces aside).
    tok = tokenizer_for(CASES["smollm2/user"], gguf_dir)
    roles = ["user", "assistant"] * (len(history) + 1)
    messages = [{"role": r, "content": c} for r, c in zip(roles, history)]
    messages.append({"role": roles[len(history)], "content": partial})
    closed = tok.apply_chat_template(messages, add_generation_prompt=False)
    open_ = tok.apply_chat_template(messages, continue_final_message=True)
    assert closed.startswith(open_) and open_.rstrip().endswith(partial.rstrip())


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False)
    | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12)


@_SETTINGS
@given(value=_JSON, indent=st.sampled_from([None, 0, 2]), sort_keys=st.booleans())
def test_tojson_round_trips(value, indent, sort_keys, gguf_dir):
    # transformers' tojson is json.dumps: whatever the arguments, the text parses back to the
    # value, and it keeps non-ASCII and HTML characters as they are.
    tok = tokenizer_for(CASES["env/tojson_default"], gguf_dir)
    text = tok.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=False,
                                   chat_template="{{ v | tojson(indent=i, sort_keys=s) }}",
                                   v=value, i=indent, s=sort_keys)
    assert json.loads(text) == value
    assert text == json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)


@pytest.fixture(scope="module")
def smollm(default_model_path) -> Tokenizer:
    with gguf.read(default_model_path) as gf:
        return from_gguf(gf)


@pytest.mark.model
def test_default_model_template_is_the_golden_one(smollm):
    # The GGUF of the default model carries SmolLM2's template, byte for byte the one the
    # golden cases were rendered from, and its ids give the same special tokens.
    golden = GOLDEN["templates"]["smollm2"]["text"]
    assert smollm.chat_template == golden
    cases = [c for c in GOLDEN["cases"] if c.get("template") == "smollm2"]
    assert smollm.chat_template_special_tokens() == cases[0]["special_tokens"]
    for case in cases:
        check(smollm, case)


@pytest.mark.parametrize("family,backend", [("lfm2.5", "numpy"), ("phi4-reasoning", "numpy"),
                                            ("lfm2.5", "mlx")])
def test_cli_chat_runs_a_template_with_generation_tags(family, backend, tmp_path, capsys):
    # The fault that opened issue 10: `--chat` refused these templates as not compiling.
    # quantref_mlx renders prompts with the same tokenizer.
    from quantref.cli import main

    if backend == "mlx":
        pytest.importorskip("mlx.core")
    path = testing.write_tiny_llama(tmp_path / "tiny.gguf", context_length=2048,
                                    chat_template=GOLDEN["templates"][family]["text"])
    assert main(["generate", "--model", str(path), "-p", "Hi", "-n", "2", "--chat",
                 "--backend", backend, "--temp", "0"]) == 0
    assert "prompt:" in capsys.readouterr().err
    with gguf.read(path) as gf:
        tok = from_gguf(gf)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.endswith("assistant<|im_sep|>" if family == "phi4-reasoning"
                           else "<|im_start|>assistant\n")
