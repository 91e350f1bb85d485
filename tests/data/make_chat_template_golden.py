"""Make ``tests/data/chat_template_golden.json``: chat templates rendered by Hugging Face
transformers, the reference ``tests/test_chat_template.py`` holds quantref to.

Run it in a separate environment (transformers is not a quantref dependency; no torch needed):

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install transformers==5.24.0 jinja2==3.1.6
    # the real templates: as GGUF files carry them (Hugging Face's @huggingface/ollama-utils
    # 0.0.18 lists the tokenizer.chat_template of Ollama's GGUF files) and llama.cpp's
    # models/templates (as vendored in the llama-cpp-python 0.3.36 sdist):
    (cd /tmp && npm pack @huggingface/ollama-utils@0.0.18 && tar xzf huggingface-ollama-utils-0.0.18.tgz)
    (cd /tmp && pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: &&
     tar xzf llama_cpp_python-0.3.36.tar.gz --wildcards '*/models/templates/*')
    /tmp/tfvenv/bin/python tests/data/make_chat_template_golden.py \\
        --ollama-utils /tmp/package --llama-cpp /tmp/llama_cpp_python-0.3.36/vendor/llama.cpp

Every expected string comes from transformers' own ``tokenizer.apply_chat_template(...,
tokenize=False)`` on a tokenizer whose ``chat_template`` and special tokens are the case's;
the ``{% generation %}`` spans from its ``render_jinja_template(...,
return_assistant_tokens_mask=True)``; an expected error is the exception transformers raised.
``strftime_now`` reads a clock frozen at ``FROZEN_NOW`` (transformers' module-level
``datetime`` is replaced while rendering; the test does the same to quantref).

The input helpers at the top (``decode``, the enum and dataclass types) import nothing outside
the standard library and numpy, so the test imports them from this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import decimal
import enum
import json
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

FROZEN_NOW = datetime(2026, 3, 14, 9, 26, 53)
OUT = Path(__file__).resolve().parent / "chat_template_golden.json"


# --------------------------------------------------------------------------------------------
# Inputs that JSON cannot spell: {"$kind": value}, decoded the same way here and in the test
# --------------------------------------------------------------------------------------------


class Role(str, enum.Enum):
    USER = "user"
    ASSISTANT = "assistant"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass
class Message:
    role: Any
    content: Any


class Opaque:
    """An object with methods a template must never reach: transformers shows it as text."""

    def delete_everything(self) -> None:  # pragma: no cover - must never be called
        raise AssertionError("a template reached an object's method")


def decode(value: Any) -> Any:
    """JSON input -> Python input: ``{"$tuple": [...]}``, ``{"$np.int64": 5}``,
    ``{"$np.float32": x}``, ``{"$np.bool_": b}``, ``{"$decimal": "1.5"}``, ``{"$bytes": "s"}``,
    ``{"$role": "user"}`` (a str enum), ``{"$level": 3}`` (an int enum), ``{"$message": {...}}``
    (a dataclass), ``{"$opaque": null}``; lists and dicts recursively."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and next(iter(value)).startswith("$"):
            (kind, v), = value.items()
            makers = {
                "$tuple": lambda v: tuple(decode(x) for x in v),
                "$np.int64": np.int64, "$np.float32": np.float32, "$np.bool_": np.bool_,
                "$decimal": decimal.Decimal, "$bytes": lambda v: v.encode(),
                "$role": Role, "$level": Level,
                "$message": lambda v: Message(**decode(v)), "$opaque": lambda v: Opaque(),
            }
            return makers[kind](v)
        return {k: decode(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------

CHATML = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}

USER = [{"role": "user", "content": "Hello, who are you?"}]
MULTI = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "Ça coûte <5€> & \"3+3\"?"},
]
MULTI_DONE = MULTI + [{"role": "assistant", "content": "6, et ça ne coûte rien."}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city, e.g. Zürich"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}]
TOOL_CHAT = [
    {"role": "user", "content": "What's the weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "abc123def", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}}]},
    {"role": "tool", "tool_call_id": "abc123def", "name": "get_weather",
     "content": "{\"temperature\": 21, \"sky\": \"clear\"}"},
]
# The same with content "" where TOOL_CHAT has None: transformers drops a None-valued key, and
# several templates then fail on message.content; these render.
TOOL_CHAT_EMPTY = [dict(m, content="") if m["content"] is None else m for m in TOOL_CHAT]
REASONING = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6", "reasoning": "Three plus three is six."},
]
PARTIAL = [{"role": "user", "content": "Write a haiku about rain."},
           {"role": "assistant", "content": "Soft rain on the roof"}]
DOCUMENTS = [{"title": "Weather report", "text": "Zürich: 21 °C, clear sky."}]


def real_template_cases(name: str, specials: dict[str, str], *, tools: bool = True,
                        thinking: bool = False, spans: bool = False) -> list[dict]:
    """The conversations every real template is rendered on."""
    c = [
        dict(id="user", messages=USER, call=dict(add_generation_prompt=True)),
        dict(id="multi-turn", messages=MULTI, call=dict(add_generation_prompt=True)),
        dict(id="multi-turn-done", messages=MULTI_DONE, call=dict(add_generation_prompt=False),
             spans=spans),
        dict(id="reasoning", messages=REASONING, call=dict(add_generation_prompt=True),
             spans=spans),
        dict(id="continue-final", messages=PARTIAL,
             call=dict(add_generation_prompt=False, continue_final_message=True)),
    ]
    if tools:
        c.append(dict(id="tools", messages=TOOL_CHAT,
                      call=dict(add_generation_prompt=True, tools=TOOLS)))
        c.append(dict(id="tools-empty-content", messages=TOOL_CHAT_EMPTY,
                      call=dict(add_generation_prompt=True, tools=TOOLS)))
    if thinking:
        c.append(dict(id="no-thinking", messages=MULTI,
                      call=dict(add_generation_prompt=True, enable_thinking=False)))
        c.append(dict(id="thinking", messages=REASONING,
                      call=dict(add_generation_prompt=True, enable_thinking=True), spans=spans))
    for case in c:
        case.update(id=f"{name}/{case['id']}", template=name, special_tokens=specials)
    return c


def environment_cases() -> list[dict]:
    """One case (or a few) per thing transformers' renderer adds or configures."""
    m1 = [{"role": "user", "content": "é <b>&'\"</b>"}]

    def case(id_: str, template: str, messages: list | None = None, spans: bool = False,
             specials: dict | None = None, **call: Any) -> dict:
        call.setdefault("add_generation_prompt", False)
        return dict(id=f"env/{id_}", inline=template, messages=m1 if messages is None else messages,
                    call=call,
                    special_tokens=CHATML if specials is None else specials, spans=spans)

    gen = ("{% for m in messages %}<{{ m.role }}>"
           "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}</a>{% endgeneration %}"
           "{% else %}{{ m.content }}{% endif %}\n{% endfor %}")
    return [
        # jinja settings
        case("trim_blocks", "{% if true %}\nA{% endif %}\nB{% for m in messages %}\n{{ m.role }}"
                            "{% endfor %}\n"),
        case("lstrip_blocks", "x\n    {% if true %}A{% endif %}\n  \t{% for m in messages %}"
                              "{{ m.role }}{% endfor %}  tail\n    {{ 'expr keeps' }}"),
        case("keep_trailing_newline_off", "{{ messages[0].role }}\n\n"),
        case("no_autoescape", "{{ messages[0].content }}|{{ '<&>' }}"),
        case("undefined_renders_empty", "[{{ nothing }}][{{ messages[0].nothing }}]"),
        case("undefined_attribute_error", "{{ nothing.attr }}"),
        # {% generation %}
        case("generation", gen, MULTI_DONE, spans=True),
        case("generation_whitespace_control",
             "{%- for m in messages -%}\n{{- m.role -}}:\n  {%- generation -%}\n   "
             "{{ m.content }}  \n  {%- endgeneration -%}\n;\n{%- endfor -%}", MULTI_DONE,
             spans=True),
        case("generation_empty_and_nested_if",
             "A{% generation %}{% endgeneration %}B{% generation %}{% if true %}x{% endif %}"
             "{% for m in messages %}{{ m.role[0] }}{% endfor %}{% endgeneration %}C", MULTI,
             spans=True),
        case("generation_in_macro",
             "{% macro turn(m) %}[{% generation %}{{ m.content }}{% endgeneration %}]{% endmacro %}"
             "{% for m in messages %}{{ turn(m) }}{% endfor %}", MULTI, spans=True),
        case("generation_untracked", gen, MULTI_DONE),
        case("generation_unclosed", "{% generation %}x"),
        # loop controls
        case("break_continue", "{% for m in messages %}{% if m.role == 'system' %}{% continue %}"
                               "{% endif %}{% if m.role == 'assistant' %}{% break %}{% endif %}"
                               "{{ m.content }};{% endfor %}", MULTI),
        # tojson
        case("tojson_default", "{{ messages | tojson }}"),
        case("tojson_indent", "{{ tools | tojson(indent=2) }}", tools=TOOLS),
        case("tojson_positional_is_ensure_ascii", "{{ messages | tojson(4) }}"),
        case("tojson_separators_sort_keys",
             "{{ tools | tojson(separators=(',', ':'), sort_keys=true) }}", tools=TOOLS),
        case("tojson_ensure_ascii", "{{ messages | tojson(ensure_ascii=true) }}"),
        case("tojson_tuple_and_numbers", "{{ x | tojson }}",
             x={"$tuple": [1, 2.5, True, None, {"$np.int64": 7}, {"$np.float32": 0.5}]}),
        case("jinja_filters_unchanged", "{{ messages[0].content | upper }}|{{ [3,1,2] | sort | "
                                        "join(',') }}|{{ 'a b' | title }}|{{ 2.567 | round(1) }}"),
        # globals
        case("raise_exception", "{% if messages | length < 2 %}{{ raise_exception('Need two "
                                "messages, got ' ~ messages | length) }}{% endif %}ok"),
        case("strftime_now", "{{ strftime_now('%Y-%m-%d %H:%M:%S') }}|{{ strftime_now('%d %B "
                             "%Y') }}|{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%A %j') }}"),
        case("dict_global", "{{ dict(a=1, b='x') | tojson }}|{{ dict([('k', 2)]) | tojson }}|"
                            "{{ dict.fromkeys(['p', 'q'], 0) | tojson }}|{{ dict.update is "
                            "defined }}|{{ dict.items is defined }}|{{ dict.mro is defined }}"),
        case("namespace", "{% set ns = namespace(n=0, seen=[]) %}{% for m in messages %}"
                          "{% set ns.n = ns.n + 1 %}{% set ns.seen = ns.seen + [m.role] %}"
                          "{% endfor %}{{ ns.n }} {{ ns.seen | join(',') }} "
                          "{{ namespace(self=1).self }}", MULTI),
        case("namespace_underscore_init", "{% set ns = namespace(_x=1) %}{{ ns._x }}"),
        case("namespace_underscore_set", "{% set ns = namespace() %}{% set ns._x = 1 %}x"),
        # the sandbox
        case("sandbox_immutable_list", "{{ messages.append({'role': 'x'}) }}"),
        case("sandbox_immutable_dict", "{{ messages[0].update({'role': 'x'}) }}"),
        case("sandbox_unsafe_attribute", "{{ messages.__class__ }}"),
        case("sandbox_format_string", "{{ '{0.__class__}'.format(messages) }}"),
        # what render_jinja_template / apply_chat_template pass in
        case("tools_documents_none", "{{ tools is defined }} {{ tools is none }} "
                                     "{{ documents is defined }} {{ documents is none }} "
                                     "{{ add_generation_prompt }}"),
        case("tools_documents_given", "{{ tools | length }} {{ documents[0].title }} "
                                      "{{ add_generation_prompt }}", tools=TOOLS,
             documents=DOCUMENTS, add_generation_prompt=True),
        case("special_tokens",
             "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ sep_token }}|{{ pad_token }}|"
             "{{ mask_token }}|{{ cls_token is defined }}",
             # every special token a GGUF file can name (it has no key for cls_token)
             specials={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                       "sep_token": "[SEP]", "pad_token": "<pad>", "mask_token": "[MASK]"}),
        case("special_tokens_absent", "{{ bos_token }}|{{ pad_token is defined }}|"
                                      "{{ mask_token is defined }}|{{ unk_token is defined }}"),
        case("kwargs_override_special_tokens", "{{ bos_token }}|{{ custom }}|{{ nested.a[1] }}",
             bos_token="OVERRIDE", custom="value", nested={"a": [1, 2]}),
        case("none_values_dropped",
             "{% for m in messages %}{{ m.role }}:{{ 'content' in m }}:{{ m.content is none }}"
             ";{% endfor %}",
             [{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                                                  "tool_calls": [{"name": "f"}]}]),
        case("reasoning_aliases",
             "{% for m in messages %}{{ m.role }}|{{ m.reasoning_content }}|{{ m.thinking }}|"
             "{{ m.reasoning }}\n{% endfor %}",
             [{"role": "assistant", "content": "a", "reasoning_content": "rc"},
              {"role": "assistant", "content": "b", "thinking": "th"},
              {"role": "assistant", "content": "c", "reasoning": "re"},
              {"role": "assistant", "content": "d", "thinking": "th2", "reasoning_content": "rc2"},
              {"role": "assistant", "content": "e", "reasoning_content": None, "reasoning": "re3"},
              {"role": "user", "content": "f"}]),
        case("plain_data",
             "{% for k, v in messages[0].content | dictsort %}{{ k }}={{ v }};{% endfor %}"
             "{{ messages[0].content.tup is sequence }}",
             [{"role": "user", "content": {
                 "tup": {"$tuple": [1, "a"]}, "i64": {"$np.int64": 42},
                 "f32": {"$np.float32": 0.25}, "b": {"$np.bool_": False},
                 "dec": {"$decimal": "1.5"}, "raw": {"$bytes": "abc"},
                 "role": {"$role": "user"}, "level": {"$level": 3},
                 "obj": {"$opaque": None}}}]),
        case("plain_data_kwargs", "{{ obj }}|{{ level }}|{{ role }}|{{ role is string }}",
             obj={"$opaque": None}, level={"$level": 3}, role={"$role": "assistant"}),
        case("dataclass_messages", "{% for m in messages %}{{ m.role }}:{{ m.content }};"
                                   "{% endfor %}",
             [{"$message": {"role": "user", "content": "from a dataclass"}},
              {"$message": {"role": {"$role": "assistant"}, "content": None}}]),
        case("content_blocks", "{% for b in messages[0].content %}{{ b.type }}:{{ b.text }};"
                               "{% endfor %}",
             [{"role": "user", "content": [{"type": "text", "text": "look"},
                                           {"type": "image"}, {"type": "text", "text": "here"}]}]),
        # continue_final_message
        case("continue_final_message",
             "{% for m in messages %}<{{ m.role }}>{{ m.content }}</end>\n{% endfor %}",
             PARTIAL, continue_final_message=True),
        case("continue_final_message_trimmed",
             "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</end>{% endfor %}",
             [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Partial  "}],
             continue_final_message=True),
        case("continue_final_message_blocks",
             "{% for m in messages %}{% for b in m.content %}{{ b.text }}|{% endfor %}"
             "</end>{% endfor %}",
             [{"role": "assistant", "content": [{"type": "text", "text": "one"},
                                                {"type": "text", "text": "two"},
                                                {"type": "image"}]}],
             continue_final_message=True),
        case("continue_final_message_reasoning",
             "{% for m in messages %}<think>{{ m.reasoning_content }}</think>{{ m.content }}"
             "</end>{% endfor %}",
             [{"role": "assistant", "content": "", "reasoning": "Let me think"}],
             continue_final_message="reasoning_content"),
        case("continue_final_message_field_not_in_template",
             "{% for m in messages %}{{ m.role }}{% endfor %}", PARTIAL,
             continue_final_message=True),
        case("continue_final_message_missing_field",
             "{% for m in messages %}{{ m.content }}{% endfor %}",
             [{"role": "assistant", "content": None}], continue_final_message=True),
        case("continue_final_message_dropped_by_template",
             "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}"
             "{% endfor %}", PARTIAL, continue_final_message=True),
        case("continue_final_message_and_generation_prompt",
             "{% for m in messages %}{{ m.content }}{% endfor %}", PARTIAL,
             continue_final_message=True, add_generation_prompt=True),
        # bad input
        case("empty_conversation", "x", messages=[]),
        case("message_not_a_mapping", "x", messages=["hello"]),
        case("document_not_a_mapping", "x", documents=["plain text"]),
        case("tool_not_a_schema", "x", tools=["get_weather"]),
        case("python_error_in_template", "{{ messages[0].content + 1 }}"),
        case("syntax_error", "{% for m in messages %}{{ m.content }}"),
        case("unknown_tag", "{% include_raw 'x' %}"),
    ]


NAMED = {"default": "default:{% for m in messages %}{{ m.content }}{% endfor %}",
         "tool_use": "tool_use:{{ tools | length }}:{% for m in messages %}{{ m.content }}"
                     "{% endfor %}",
         "rag": "rag:{{ documents | length }}"}


def named_template_cases() -> list[dict]:
    def case(id_: str, named: dict, **call: Any) -> dict:
        call.setdefault("add_generation_prompt", False)
        return dict(id=f"named/{id_}", named=named, messages=USER, call=call,
                    special_tokens=CHATML)

    no_default = {k: v for k, v in NAMED.items() if k != "default"}
    return [
        case("default", NAMED),
        case("tools_pick_tool_use", NAMED, tools=TOOLS),
        case("by_name", NAMED, chat_template="rag", documents=DOCUMENTS),
        case("text_passed", NAMED, chat_template="literal:{{ messages | length }}"),
        case("no_default", no_default),
        case("no_default_tools", no_default, tools=TOOLS),
    ]


# name: (where the text comes from, special tokens as the GGUF file gives them, case options)
REAL = {
    "smollm2": ("ollama:library/smollm2:135m", {**CHATML, "unk_token": "<|endoftext|>",
                                                 "pad_token": "<|im_end|>"},
                dict(tools=False)),
    "llama3.2": ("ollama:library/llama3.2:3b",
                 {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, {}),
    "llama3.1": ("ollama:library/llama3.1:8b",
                 {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, {}),
    "qwen2.5": ("ollama:library/qwen2.5:0.5b",
                {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                 "pad_token": "<|endoftext|>"}, {}),
    "qwen3": ("ollama:library/qwen3:0.6b",
              {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>"}, dict(thinking=True)),
    "gemma3": ("ollama:library/gemma3:270m",
               {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
                "pad_token": "<pad>"}, {}),
    "phi4-reasoning": ("ollama:library/phi4-reasoning:14b",
                       {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                        "pad_token": "<|dummy_85|>"}, dict(tools=False, spans=True)),
    "phi4-mini": ("ollama:library/phi4-mini:3.8b",
                  {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>"}, {}),
    "deepseek-r1": ("ollama:library/deepseek-r1:8b",
                    {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
                    {}),
    "granite3.3": ("llama.cpp:models/templates/ibm-granite-granite-3.3-2B-Instruct.jinja",
                   {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>",
                    "pad_token": "<|end_of_text|>"}, dict(thinking=True)),
    "mistral-small-3.2": (
        "llama.cpp:models/templates/Mistral-Small-3.2-24B-Instruct-2506.jinja",
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, {}),
    "smollm3": ("llama.cpp:models/templates/HuggingFaceTB-SmolLM3-3B.jinja",
                {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                 "pad_token": "<|im_end|>"}, dict(thinking=True)),
    "lfm2.5": ("llama.cpp:models/templates/LFM2.5-8B-A1B.jinja",
               {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>",
                "pad_token": "<|pad|>"}, dict(thinking=True, spans=True)),
    "gpt-oss": ("llama.cpp:models/templates/openai-gpt-oss-120b.jinja",
                {"bos_token": "<|startoftext|>", "eos_token": "<|return|>",
                 "pad_token": "<|endoftext|>"}, {}),
}


def load_template(source: str, ollama_utils: Path, llama_cpp: Path) -> str:
    kind, where = source.split(":", 1)
    if kind == "llama.cpp":
        return (llama_cpp / where).read_text(encoding="utf-8")
    # the generated TypeScript map: { model: "library/x:tag", gguf: "<template>", ... }
    ts = (ollama_utils / "src" / "chat-template-automap.ts").read_text(encoding="utf-8")
    at = ts.index(f'model: "{where}"')
    m = re.compile(r'gguf:\s*("(?:[^"\\]|\\.)*")', re.S).search(ts, at)
    if m is None:
        raise SystemExit(f"no gguf template for {where}")
    return json.loads(m.group(1))


# --------------------------------------------------------------------------------------------
# Rendering with transformers
# --------------------------------------------------------------------------------------------


def render(case: dict, templates: dict[str, dict]) -> dict:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    from transformers.utils.chat_template_utils import (_normalize_chat_messages,
                                                        render_jinja_template)

    if "template" in case:
        chat_template: Any = templates[case["template"]]["text"]
    elif "inline" in case:
        chat_template = case["inline"]
    else:
        chat_template = case["named"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=RustTokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
        chat_template=chat_template, **case["special_tokens"])
    assert tok.special_tokens_map == case["special_tokens"], tok.special_tokens_map
    messages, call = decode(case["messages"]), decode(case["call"])
    try:
        text = tok.apply_chat_template(messages, tokenize=False, **call)
    except Exception as e:  # the reference's error is the expected result
        return {"error": type(e).__name__, "message": str(e)}
    out: dict[str, Any] = {"text": text}
    if case.get("spans"):
        kw = dict(call)
        tools, documents = kw.pop("tools", None), kw.pop("documents", None)
        gen_prompt = kw.pop("add_generation_prompt", False)
        rendered, spans = render_jinja_template(
            conversations=[_normalize_chat_messages(decode(case["messages"]))], tools=tools,
            documents=documents, chat_template=tok.get_chat_template(None, tools),
            return_assistant_tokens_mask=True, add_generation_prompt=gen_prompt,
            **{**tok.special_tokens_map, **kw})
        assert rendered[0] == text
        out["spans"] = [list(s) for s in spans[0]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ollama-utils", type=Path, required=True,
                    help="the unpacked @huggingface/ollama-utils 0.0.18 npm package")
    ap.add_argument("--llama-cpp", type=Path, required=True,
                    help="llama.cpp's source tree (vendor/llama.cpp of llama-cpp-python 0.3.36)")
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    args = ap.parse_args()

    import jinja2
    import transformers
    import transformers.utils.chat_template_utils as ctu

    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return FROZEN_NOW

    ctu.datetime = FrozenClock  # strftime_now reads the module's datetime when called

    templates = {name: {"source": src, "text": load_template(src, args.ollama_utils,
                                                               args.llama_cpp)}
                 for name, (src, _, _) in REAL.items()}
    cases = environment_cases() + named_template_cases()
    for name, (_, specials, opts) in REAL.items():
        cases += real_template_cases(name, specials, **opts)
    for case in cases:
        case["expected"] = render(case, templates)
    golden = {
        "made_by": "tests/data/make_chat_template_golden.py",
        "transformers": transformers.__version__,
        "jinja2": jinja2.__version__,
        "frozen_now": FROZEN_NOW.isoformat(),
        "templates": templates,
        "cases": cases,
    }
    args.output.write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n",
                           encoding="utf-8")
    errors = sum("error" in c["expected"] for c in cases)
    print(f"{args.output}: {len(cases)} cases ({errors} expected errors), "
          f"{len(templates)} real templates", file=sys.stderr)


if __name__ == "__main__":
    main()
