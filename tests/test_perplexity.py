"""Perplexity: its definition on a tiny model, windows, BOS, KL, and the acceptance figure on
the real default model."""

from __future__ import annotations

import math

import numpy as np
import pytest

import quantref
from quantref.perplexity import kl_divergence, log_softmax, perturbation_scale
from quantref.testing import write_tiny_llama

TEXT = ("The river town kept its ferry running through the winter, and the ferryman "
        "counted the crossings in a ledger. ") * 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return quantref.load(write_tiny_llama(tmp_path_factory.mktemp("m") / "t.gguf", dim=128,
                                          n_heads=2, n_kv_heads=1, hidden_dim=128, seed=3,
                                          context_length=1024))


def manual_nll(m, window: list[int]) -> np.ndarray:
    logits = m.forward(window).astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    return (lse - logits[np.arange(len(window)), window[1:] + [0]])[:-1]


def test_perplexity_is_exp_of_the_mean_nll_of_every_token_after_the_first(tiny):
    ids = tiny.tokenizer.encode(TEXT, add_special=False)
    r = quantref.perplexity(tiny, TEXT, batch=7)
    assert r.tokens == len(ids) and r.n_scored == len(ids) - 1
    # float32 logits summed in float64 by us vs by the float64 recomputation: 1e-5 relative
    np.testing.assert_allclose(r.nll, manual_nll(tiny, ids), rtol=1e-5, atol=1e-5)
    assert math.isclose(r.ppl, math.exp(r.nll.mean()), rel_tol=1e-12)
    assert r.argmax.shape == (r.n_scored,)


def test_windows_are_independent_and_score_all_but_their_first_token(tiny):
    ids = tiny.tokenizer.encode(TEXT, add_special=False)
    assert len(ids) % 40  # a short remainder follows the full windows
    r = quantref.perplexity(tiny, ids=ids, ctx=40, batch=16)
    n_full, rest = divmod(len(ids), 40)
    windows = [ids[i * 40:(i + 1) * 40] for i in range(n_full)]
    # the remainder is scored in a window of the text's last 40 tokens: all of its tokens,
    # each with the context before it
    want = np.concatenate([manual_nll(tiny, w) for w in windows]
                          + [manual_nll(tiny, ids[-40:])[-rest:]])
    assert r.n_scored == len(want) == n_full * 39 + rest
    assert r.tokens == (n_full + 1) * 40 and r.scoring == "all"
    np.testing.assert_allclose(r.nll, want, rtol=1e-5, atol=1e-5)


def test_a_one_token_remainder_is_scored_with_context(tiny):
    ids = tiny.tokenizer.encode(TEXT, add_special=False)[:81]  # two windows of 40, then one
    r = quantref.perplexity(tiny, ids=ids, ctx=40)
    assert r.n_scored == 2 * 39 + 1
    np.testing.assert_allclose(r.nll[-1], manual_nll(tiny, ids[-40:])[-1], rtol=1e-5)


def test_bos_is_put_in_front_of_each_window_when_the_metadata_asks(tmp_path):
    m = quantref.load(write_tiny_llama(tmp_path / "bos.gguf", add_bos=True, seed=4))
    ids = m.tokenizer.encode(TEXT, add_special=False)
    assert ids[0] != m.tokenizer.bos_id
    r = quantref.perplexity(m, TEXT, ctx=31)
    per_window = 30
    n_full, rest = divmod(len(ids), per_window)
    assert rest
    bos = [m.tokenizer.bos_id]
    windows = [bos + ids[i * per_window:(i + 1) * per_window] for i in range(n_full)]
    want = [manual_nll(m, w) for w in windows] + [manual_nll(m, bos + ids[-per_window:])[-rest:]]
    assert r.n_scored == len(ids)  # every text token is scored once, each window from BOS
    np.testing.assert_allclose(r.nll, np.concatenate(want), rtol=1e-5, atol=1e-5)


def llama_perplexity_nll(m, ids: list[int], n: int) -> np.ndarray:
    """llama-perplexity's perplexity() (tools/perplexity/perplexity.cpp), step by step: the
    tokens with BOS first when the model adds it, full chunks of n only, BOS written over each
    chunk's first token, the predictions from positions n/2 .. n-2 scored."""
    add_bos = m.tokenizer.add_bos
    tokens = ([m.tokenizer.bos_id] if add_bos else []) + list(ids)
    out = []
    for c in range(len(tokens) // n):
        chunk = tokens[c * n:(c + 1) * n]
        if add_bos:
            chunk[0] = m.tokenizer.bos_id
        out.append(manual_nll(m, chunk)[n // 2:])  # manual_nll: positions 0 .. n-2
    return np.concatenate(out)


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("n", [16, 33])
def test_llama_cpp_scoring_is_llama_perplexitys(tmp_path, add_bos, n):
    m = quantref.load(write_tiny_llama(tmp_path / "m.gguf", add_bos=add_bos, seed=5))
    ids = m.tokenizer.encode(TEXT, add_special=False)
    r = quantref.perplexity(m, ids=ids, ctx=n, batch=7, scoring="llama.cpp")
    want = llama_perplexity_nll(m, ids, n)
    n_chunks = (len(ids) + add_bos) // n
    assert r.n_scored == len(want) == n_chunks * (n - 1 - n // 2)
    assert r.tokens == n_chunks * n and r.scoring == "llama.cpp"
    np.testing.assert_allclose(r.nll, want, rtol=1e-5, atol=1e-5)
    assert math.isclose(r.ppl, math.exp(want.mean()), rel_tol=1e-5)


def test_llama_cpp_scoring_refuses_what_llama_perplexity_refuses(tiny):
    ids = tiny.tokenizer.encode(TEXT, add_special=False)
    with pytest.raises(ValueError, match=r"at least 2 \* ctx = 600 tokens"):
        quantref.perplexity(tiny, ids=ids, ctx=300, scoring="llama.cpp")
    with pytest.raises(ValueError, match="= 1024 tokens"):  # the default ctx is 512
        quantref.perplexity(tiny, ids=ids, scoring="llama.cpp")
    with pytest.raises(ValueError, match="at least 3"):
        quantref.perplexity(tiny, ids=ids, ctx=2, scoring="llama.cpp")
    with pytest.raises(ValueError, match="unknown scoring"):
        quantref.perplexity(tiny, ids=ids, scoring="llama")


def test_kl_against_a_reference_run(tiny):
    ref = quantref.perplexity(tiny, TEXT, keep_logprobs=True)
    same = quantref.perplexity(tiny, TEXT, reference=ref, keep_logprobs=True)
    # identical arithmetic: KL(p || p) is exactly 0 and every top-1 agrees
    assert np.all(same.kl == 0) and same.top1_agree == 1.0
    other = quantref.perplexity(tiny, TEXT, kv="q4_0", reference=ref, keep_logprobs=True)
    np.testing.assert_allclose(other.kl, kl_divergence(ref.logprobs, other.logprobs), rtol=1e-12)
    assert other.kl.min() >= -1e-9 and other.kl.mean() > 0  # Gibbs' inequality, and q4_0 is lossy
    # log-probabilities are normalised rows
    np.testing.assert_allclose(np.exp(ref.logprobs.astype(np.float64)).sum(1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="keep_logprobs"):
        quantref.perplexity(tiny, TEXT, reference=other.__class__(**{**vars(other),
                                                                    "logprobs": None}))


def test_log_softmax_is_stable_for_huge_logits():
    lp, lse = log_softmax(np.array([[1e30, 0.0, -1e30]], dtype=np.float32))
    assert lp[0, 0] == 0 and np.isfinite(lse).all()


def test_perturbation_scales_step_one_ulp_at_a_time():
    assert perturbation_scale(0) == 1.0
    assert perturbation_scale(1) == np.nextafter(np.float32(1), np.float32(2))
    assert perturbation_scale(2) == np.nextafter(np.float32(1), np.float32(0))
    assert perturbation_scale(3) > perturbation_scale(1) > 1 > perturbation_scale(2)
    assert perturbation_scale(3) - 1 == 2 * (perturbation_scale(1) - 1)


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="exactly one"):
        quantref.perplexity(tiny)
    with pytest.raises(ValueError, match="too few tokens"):
        quantref.perplexity(tiny, ids=[5])
    with pytest.raises(ValueError, match="exceeds the model's context"):
        quantref.perplexity(tiny, TEXT, ctx=10_000)
    with pytest.raises(ValueError, match="turbo_kv"):
        quantref.perplexity(tiny, TEXT, kv="fp16", k_window=8)


@pytest.fixture(scope="module")
def default_model(default_model_path):
    return quantref.load(default_model_path)


@pytest.mark.model
def test_default_model_ppl_1k_matches_llama_cpp(default_model, ppl_1k_text):
    r = quantref.perplexity(default_model, ppl_1k_text)
    assert r.tokens == 1116 and r.n_scored == 1115
    # llama.cpp: 12.518 on the exact F32 export of these weights with an f32 KV cache; the
    # acceptance band of the issue is +-0.01
    assert abs(r.ppl - 12.52) <= 0.01, r.ppl
    assert r.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4


@pytest.mark.model
@pytest.mark.slow  # whole-text runs of the real model: the README's command keeps one (above)
def test_default_model_llama_cpp_scoring_matches_llama_perplexity(default_model, ppl_1k_text):
    r = quantref.perplexity(default_model, ppl_1k_text, ctx=512, scoring="llama.cpp")
    assert r.n_scored == 510 and r.tokens == 1024  # two chunks of 512, 255 scored in each
    # llama.cpp's algorithm through llama-cpp-python 0.3.36 on the F32 export: 18.4142 (issue
    # 10). We give 18.41367 (+-3e-6 over 1-ulp perturbations). The 3e-5 gap is in attention
    # precision, not in which tokens are scored: with llama.cpp's default f16 KV cache and its
    # non-flash CPU path (query and probabilities rounded to f16) simulated, our figure moves
    # by 1e-4 either way (18.4134..18.4155). 2e-4 relative covers that, not a scoring change.
    assert abs(r.ppl / 18.4142 - 1) < 2e-4, r.ppl


@pytest.mark.model
@pytest.mark.slow
def test_fp32_cache_is_not_chaotic_under_one_ulp_perturbations(default_model, ppl_1k_text):
    ids = default_model.tokenizer.encode(ppl_1k_text, add_special=False)
    base = quantref.perplexity(default_model, ids=ids[:400])
    for k in (1, 2):
        r = quantref.perplexity(default_model, ids=ids[:400], perturb=k)
        assert r.embed_scale != 1.0
        # a 1-ulp scale of the embeddings moves an fp32 run by float noise only (~1e-6)
        assert abs(r.ppl / base.ppl - 1) < 1e-4, (k, r.ppl, base.ppl)


# llama.cpp (llama-cpp-python 0.3.36, CPU, flash attention) on the default model's F32 export,
# the first 3000 bytes of ppl_1k.txt, six windows of 128 tokens, every token after a window's
# first scored (issue 10). quantref.load of the shipped Q4_1 file holds exactly the F32 export's
# float32 weights (checked tensor by tensor), so the default model stands in for it.
# Tolerance: a compressed cache's perplexity is chaotic: any rounding-level change (a 1-ulp
# scale of the embeddings, BLAS's thread count, the prefill batch) moves it across a range, and
# llama.cpp's figure is one draw from that range, our exact run another. Measured ranges
# (`quantref ppl --perturb 10` and batch 32..128 / 1-2 BLAS threads on these 768 tokens):
#   q8_0        50.485 .. 50.617 (width 0.132)   llama.cpp 50.5764
#   q4_0        51.757 .. 52.615 (width 0.858)   llama.cpp 52.2692
#   q8_0_norot  50.704 .. 50.864 (width 0.161)   llama.cpp 50.7560
#   q4_0_norot  54.845 .. 57.025 (width 2.180)   llama.cpp 56.6637
# so a run within the range is within its width of llama.cpp's. The widths still tell the
# rotation apart: rotated and unrotated q4_0 are 4.4 apart, q8_0 0.18. llama.cpp's own figure
# is one draw too: the same source rebuilt gives q4_0_norot 56.5521, and 54.869 .. 57.108 over
# the same twenty perturbations (docs/kv_results.md); that its attention is ours exactly, given
# the same inputs, is tests/test_llama_cpp_kv.py.
LLAMA_CPP_KV = [
    # all slow: six windows of the real model each (the README's command keeps the ppl_1k test)
    pytest.param("fp32", 50.6251, 2e-4, marks=pytest.mark.slow),  # no chaos: the reference's
    # 4-decimal rounding, float noise
    pytest.param("q4_0", 52.2692, 0.858, marks=pytest.mark.slow),
    pytest.param("q8_0", 50.5764, 0.132, marks=pytest.mark.slow),
    pytest.param("q8_0_norot", 50.7560, 0.161, marks=pytest.mark.slow),
    pytest.param("q4_0_norot", 56.6637, 2.180, marks=pytest.mark.slow),
]


@pytest.mark.model
@pytest.mark.parametrize("kv, want, tol", LLAMA_CPP_KV)
def test_quantized_kv_caches_match_llama_cpp(default_model, ppl_1k_text, kv, want, tol):
    text = ppl_1k_text.encode("utf-8")[:3000].decode("utf-8")
    ids = default_model.tokenizer.encode(text, add_special=False)
    assert len(ids) == 770  # six windows of 128, and a remainder of 2 that llama.cpp's run left out
    r = quantref.perplexity(default_model, ids=ids[:768], ctx=128, kv=kv)
    assert r.n_scored == 6 * 127
    assert abs(r.ppl - want) <= tol, (kv, r.ppl, want)
