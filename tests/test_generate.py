"""Generation on both backends: sampling, stopping, streaming, chat, greedy parity, and the
proof that an MLX decode step is built without a single evaluation or host transfer."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import quantref
from quantref.generate import SamplerArgs, SamplerRNG, encode_prompt, sample
from quantref.testing import write_tiny_llama
from quantref.tokenizer import ChatTemplateError

mx = pytest.importorskip("mlx.core")
import quantref_mlx  # noqa: E402
from quantref_mlx.generate import Decoder, decode_step, make_sampler  # noqa: E402


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("g") / "tiny.gguf", dim=128, n_heads=2,
                            n_kv_heads=1, hidden_dim=128, context_length=512, seed=11)


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return quantref.load(tiny_path), quantref_mlx.load(tiny_path, weights="float")


def test_sampling_rules():
    logits = np.array([0.0, 3.0, 1.0, 2.9, -5.0], np.float32)
    rng = SamplerRNG(0)
    assert sample(logits, SamplerArgs(), rng) == 1  # greedy
    draws = {sample(logits, SamplerArgs(temp=1.0, top_k=2), rng) for _ in range(200)}
    assert draws == {1, 3}  # only the two most likely survive top-k = 2
    # top-p = 0.5: token 1 alone holds ~47% (< 0.5), so token 3 must be kept as well, no more
    draws = {sample(logits, SamplerArgs(temp=1.0, top_p=0.5), rng) for _ in range(200)}
    assert draws == {1, 3}
    with pytest.raises(ValueError, match="top_p"):
        SamplerArgs(top_p=0)
    with pytest.raises(ValueError, match="temp"):
        SamplerArgs(temp=-1)


def test_mlx_sampler_rules():
    logits = mx.array([[0.0, 3.0, 1.0, 2.9, -5.0]])
    assert make_sampler(SamplerArgs())(logits).item() == 1
    top_k, top_p = (make_sampler(SamplerArgs(temp=1.0, top_k=2), SamplerRNG(0)),
                    make_sampler(SamplerArgs(temp=1.0, top_p=0.5), SamplerRNG(1)))
    draws = {top_k(logits).item() for _ in range(100)}
    assert draws == {1, 3}
    draws = {top_p(logits).item() for _ in range(100)}
    assert draws == {1, 3}


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_stream_generate_stops_and_streams(tiny, backend):
    m = tiny[0] if backend == "numpy" else tiny[1]
    engine = quantref if backend == "numpy" else quantref_mlx
    out = list(engine.stream_generate(m, "hello there", 12))
    assert len(out) <= 12 and out[-1].finish_reason in ("stop", "length")
    assert [r.generation_tokens for r in out] == list(range(1, len(out) + 1))
    text = "".join(r.text for r in out)
    tokens = [r.token for r in out if r.token not in m.tokenizer.eog_ids]
    assert text == m.tokenizer.decode(tokens)
    assert engine.generate(m, "hello there", 12) == text
    with pytest.raises(ValueError, match="max_tokens"):
        list(engine.stream_generate(m, "x", 0))


def test_end_of_generation_stops(tiny_path):
    m = quantref.load(tiny_path)
    m.weights.output = m.weights.output.copy()
    m.weights.output[m.tokenizer.eos_id] += 100.0 * m.weights.output_norm  # EOS always wins
    # the raw prompt (chat=False): the EOS row's boost wins from this prompt's last state
    out = list(quantref.stream_generate(m, "hello", 10, chat=False))
    assert len(out) == 1 and out[0].finish_reason == "stop" and out[0].text == ""


def test_chat_prompts_use_the_template(tiny):
    m = tiny[0]
    ids = encode_prompt(m.tokenizer, "hi", chat=True)
    text = m.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids == m.tokenizer.encode(text, parse_special=True)
    assert m.tokenizer.token_to_id("<|im_start|>") in ids


def test_text_prompts_use_the_chat_template_by_default(tiny_path):
    """mlx-lm's default: a text prompt is one user message through the model's chat template
    when it has one; ``chat=False`` sends the raw text; ids pass through untouched. Both
    backends, and the CLI (``--no-chat`` / ``--raw``)."""
    m, mm = quantref.load(tiny_path), quantref_mlx.load(tiny_path, weights="float")
    tok = m.tokenizer
    templated = encode_prompt(tok, "hi", chat=True)
    raw = tok.encode("hi", add_special=True)
    assert templated != raw and encode_prompt(tok, "hi") == templated
    assert encode_prompt(tok, "hi", chat=False) == raw
    assert encode_prompt(tok, [5, 6], chat=True) == [5, 6]
    for engine, model in ((quantref, m), (quantref_mlx, mm)):
        assert next(engine.stream_generate(model, "hi", 1)).prompt_tokens == len(templated)
        assert next(engine.stream_generate(model, "hi", 1, chat=False)).prompt_tokens == len(raw)
    for flag, n in (([], len(templated)), (["--no-chat"], len(raw)), (["--raw"], len(raw))):
        p = subprocess.run([sys.executable, "-m", "quantref.cli", "generate", "--model",
                            str(tiny_path), "--backend", "numpy", "-p", "hi", "-n", "1", *flag],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert f"prompt: {n} tokens" in p.stderr, (flag, p.stderr)
    # a model without a template: raw text by default, a clear error when chat is required
    tok = quantref.load(tiny_path).tokenizer
    tok.chat_template = None  # as a GGUF without tokenizer.chat_template loads (Gemma's here)
    assert encode_prompt(tok, "hi") == raw
    with pytest.raises(ChatTemplateError, match="chat_template is absent"):
        encode_prompt(tok, "hi", chat=True)


@pytest.mark.parametrize("kv", ["fp32", "fp16", "q8_0", "turbo_kv_4b"])
def test_greedy_tokens_agree_on_the_tiny_model(tiny, kv):
    a = [r.token for r in quantref.stream_generate(tiny[0], "the river", 16, kv=kv)]
    b = [r.token for r in quantref_mlx.stream_generate(tiny[1], "the river", 16, kv=kv)]
    c = [r.token for r in quantref_mlx.stream_generate(tiny[1], "the river", 16, kv=kv,
                                                       compiled=False)]
    assert a == b == c


class _Counter:
    """Counts evaluations and host transfers of MLX arrays while installed."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = {}
        for owner, name in ((mx, "eval"), (mx, "async_eval"), (mx.array, "item"),
                            (mx.array, "tolist"), (mx.array, "__array__"),
                            (mx.array, "__float__"), (mx.array, "__int__"),
                            (mx.array, "__bool__")):
            monkeypatch.setattr(owner, name, self._wrap(name, getattr(owner, name)))
        # NumPy reads an MLX array through the buffer protocol, not __array__: count the NumPy
        # entry points when they are handed an MLX array.
        for name in ("array", "asarray", "ascontiguousarray", "frombuffer"):
            monkeypatch.setattr(np, name, self._wrap(f"np.{name}", getattr(np, name),
                                                     only_mlx=True))

    def _wrap(self, name, original, only_mlx=False):
        def counted(*args, **kwargs):
            if not only_mlx or (args and isinstance(args[0], mx.array)):
                self.calls[name] = self.calls.get(name, 0) + 1
            return original(*args, **kwargs)
        return counted

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def test_a_decode_step_is_built_without_evaluating(tiny, monkeypatch):
    mm = tiny[1]
    sampler = make_sampler(SamplerArgs())
    for kv in ("fp32", "turbo_kv_4b", "q4_0"):
        cache = mm.make_cache(kv)
        logits = mm.forward([5, 6, 7, 8], cache, last_only=True)
        mx.eval(logits, cache.state())
        y = sampler(logits)
        mx.eval(y)
        counter = _Counter(monkeypatch)
        # the counter sees a host transfer (so a step that made one would be caught) ...
        np.array(mx.array([1.0]))
        assert counter.calls == {"np.array": 1}
        counter.calls.clear()
        # ... and a whole decode step, eager or compiled, makes none
        nxt = decode_step(mm, y, cache, sampler)
        assert counter.total == 0, counter.calls
        decoder = Decoder(mm, cache, sampler, compiled=True)
        nxt2 = decoder(nxt)
        assert counter.total == 0, counter.calls
        mx.eval(nxt2)  # the one evaluation of the step
        assert counter.calls == {"eval": 1}
        monkeypatch.undo()


def test_a_step_cache_builds_its_mask_once(tiny):
    """The StepCache's additive mask ([T, capacity], -inf after each query's position: what a
    compiled step attends with) is one array for every layer: mx.compile does not merge equal
    aranges, so a mask built per layer launched its kernels once per layer (2 of a turbo_kv
    layer's ~28 on a GPU)."""
    from quantref_mlx.cache import StepCache

    mm = tiny[1]
    cache = mm.make_cache("turbo_kv_4b")
    mx.eval(mm.forward([5, 6, 7], cache, last_only=True), cache.state())
    cache.reserve(256)
    k, v = cache.take_buffers()
    view = StepCache(cache.k_codec, cache.v_codec, k, v, mx.array(3, mx.int32))
    mask = view.mask(1)
    assert view.mask(1) is mask
    expected = np.where(np.arange(256) > 3, -np.inf, 0.0).astype(np.float32)[None]
    assert np.array_equal(np.array(mask), expected)
    two = np.array(view.mask(2))  # queries at positions 3 and 4
    assert np.array_equal(two[0], expected[0])
    assert np.array_equal(two[1], np.where(np.arange(256) > 4, -np.inf, 0.0))


def test_generation_evaluates_once_per_token(tiny, monkeypatch):
    counter = _Counter(monkeypatch)
    n = 10
    # sampled with a penalty window and min-p: the window stays on the device, no extra sync
    out = list(quantref_mlx.stream_generate(tiny[1], "the river bank", n, temp=0.7, seed=3,
                                            repeat_penalty=1.2, min_p=0.05))
    # prefill: one eval (a single chunk, with the first token); then one async_eval per further
    # token (the next step starts before a token is read, so a stop at k < n has started k),
    # and one host transfer per token: the token itself
    k = len(out)
    assert counter.calls == {"eval": 1, "async_eval": min(k, n - 1), "item": k}, counter.calls


def test_per_op_sync_evaluates_every_operation(tiny_path, monkeypatch):
    mm = quantref_mlx.load(tiny_path, weights="float", sync="op")
    cache = mm.make_cache("fp32")
    mx.eval(mm.forward([5, 6, 7], cache))
    counter = _Counter(monkeypatch)
    decode_step(mm, mx.array([9]), cache, make_sampler(SamplerArgs()))
    assert counter.calls["eval"] > 20 * mm.args.n_layers / 2  # dozens per layer


@pytest.mark.model
@pytest.mark.slow
def test_greedy_generation_agrees_on_the_default_model(default_model_path):
    """fp32 KV, a fixed prompt: the same tokens from the oracle and from MLX."""
    m = quantref.load(default_model_path)
    mm = quantref_mlx.load(default_model_path, weights="float")
    prompt = "What is the boiling point of water at sea level?"
    a = [r.token for r in quantref.stream_generate(m, prompt, 32, chat=True)]
    b = [r.token for r in quantref_mlx.stream_generate(mm, prompt, 32, chat=True)]
    assert a == b
    assert "100" in m.tokenizer.decode(a)
