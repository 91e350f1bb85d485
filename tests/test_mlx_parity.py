"""The MLX half against the NumPy oracle: layer by layer on a tiny model, stored bytes of every
cache type, and perplexity on the real default model.

Tolerances: both halves compute in float32 with the same weights; they differ in summation
order (BLAS vs MLX kernels), in RMSNorm's accumulation (float64 in the oracle, float32 in
``mx.fast.rms_norm``) and in RoPE's angles (float64 vs float32 inside ``mx.fast.rope``), which
moves a block's output by ~1e-6 relative; 1e-4 leaves room for that, not for a wrong formula.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import quantref  # noqa: E402
import quantref_mlx  # noqa: E402
from quantref.cache import GGML_TYPES, KV_TYPES  # noqa: E402
from quantref.testing import write_tiny_llama  # noqa: E402
from quantref_mlx import quants as mlx_quants  # noqa: E402

REL = 1e-4  # see the module docstring


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("p") / "tiny.gguf", n_layers=2, dim=256,
                            n_heads=4, n_kv_heads=2, hidden_dim=192, context_length=512, seed=7)
    return quantref.load(path), quantref_mlx.load(path, weights="float")


def _close(got, want, rel=REL):
    got = np.asarray(got)
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * np.abs(want).max())


def _to_mlx_parts(kind: str, parts: tuple[np.ndarray, ...]) -> tuple:
    """NumPy stored form -> the MLX cache's stored form of the same bits."""
    if kind in GGML_TYPES:
        return mlx_quants.from_ggml_bytes(parts[0], kind[:4])
    return tuple(mx.array(p) for p in parts)


def _stored_as_bytes(kind: str, parts) -> list[np.ndarray]:
    """Either half's stored arrays as raw bytes, for a byte-for-byte comparison."""
    if kind in GGML_TYPES and len(parts) == 2:  # MLX's (codes, d) pair
        return [mlx_quants.to_ggml_bytes(*parts, kind[:4])]
    return [np.ascontiguousarray(np.asarray(p)).view(np.uint8) for p in parts]


def test_whole_forward_matches(pair):
    m, mm = pair
    ids = [5, 77, 100, 3, 260, 42, 42, 199, 7, 150]
    _close(mm.forward(ids), m.forward(ids))


@pytest.mark.parametrize("kv", ["fp32", "fp16"])
def test_each_layer_given_the_same_input(pair, kv):
    """Prefill 9 tokens, then decode 3, block by block: each MLX block is fed the oracle's input
    for that block and must give the oracle's output."""
    m, mm = pair
    rng = np.random.default_rng(0)
    np_cache, mx_cache = m.make_cache(kv), mm.make_cache(kv)
    for T in (9, 1, 1, 1):
        x = rng.standard_normal((T, m.args.dim)).astype(np.float32)
        for layer in range(m.args.n_layers):
            want = m.block(layer, x, np_cache)
            got = mm.block(layer, mx.array(x), mx_cache)
            _close(got, want)
            x = want
        np_cache.commit(T)
        mx_cache.commit(T)


@pytest.mark.parametrize("kv", [k for k in KV_TYPES if k not in ("fp32", "fp16")])
def test_compressed_caches_store_identical_bytes(pair, kv):
    m, mm = pair
    k = np.random.default_rng(1).standard_normal((2, 37, 32)).astype(np.float32) * 3
    k = np.concatenate([k, -k], axis=-1)  # head_dim 64, with exact ties of magnitude
    v = np.ascontiguousarray(k[:, ::-1])
    np_cache, mx_cache = m.make_cache(kv), mm.make_cache(kv)
    for layer in range(m.args.n_layers):
        np_cache.append(layer, k, v)
        mx_cache.append(layer, mx.array(k), mx.array(v))
    for layer in range(m.args.n_layers):
        for side in (0, 1):  # K, then V
            want = _stored_as_bytes(kv, np_cache.stored(layer)[side])
            got = _stored_as_bytes(kv, mx_cache.stored(layer)[side])
            assert len(got) == len(want)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("kv", [k for k in KV_TYPES if k not in ("fp32", "fp16")]
                         + ["turbo_kv_4b/v=q4", "turbo_kv_3b/v=q2/w=4"])
def test_layers_agree_when_reading_the_same_stored_bytes(pair, kv):
    """A compressed cache's whole-run results may differ (a last-bit difference in a key can
    flip a codebook index), so the read side is compared on its own: the MLX cache is made to
    store the oracle's bytes, and each block's output must then agree."""
    m, mm = pair
    kind, *opts = kv.split("/")
    options = {}
    for o in opts:
        if o.startswith("v="):
            options["v"] = o[2:]
        if o.startswith("w="):
            options["k_window"] = int(o[2:])
    np_cache, mx_cache = m.make_cache(kind, **options), mm.make_cache(kind, **options)
    replay = {}

    def append(layer, k, v, _orig=mx_cache.append):
        _orig(layer, k, v)
        L = mx_cache.length + mx_cache._pending[layer]
        np_k, np_v = np_cache.stored(layer)
        for buf, parts in ((mx_cache._k[layer], np_k), (mx_cache._v[layer], np_v)):
            fresh = _to_mlx_parts(kind, tuple(p[:, mx_cache.length:L] for p in parts))
            buf.write(mx_cache.length, fresh)
        replay[layer] = True

    mx_cache.append = append
    rng = np.random.default_rng(2)
    for T in (7, 1, 1):
        x = rng.standard_normal((T, m.args.dim)).astype(np.float32)
        for layer in range(m.args.n_layers):
            want = m.block(layer, x, np_cache)
            got = mm.block(layer, mx.array(x), mx_cache)
            _close(got, want)
            x = want
        np_cache.commit(T)
        mx_cache.commit(T)
    assert replay  # the replay really happened


@pytest.mark.parametrize("scoring, ctx", [("all", 24), ("llama.cpp", 20)])
def test_perplexity_scores_the_same_tokens(pair, scoring, ctx):
    """Both halves share the windows (a remainder in the text's last window for ``all``, the
    second half of full chunks for ``llama.cpp``) and agree on every scored token's NLL."""
    m, mm = pair
    ids = [int(i) for i in np.random.default_rng(5).integers(3, 250, 70)]
    a = quantref.perplexity(m, ids=ids, ctx=ctx, batch=16, scoring=scoring)
    b = quantref_mlx.perplexity(mm, ids=ids, ctx=ctx, batch=16, scoring=scoring)
    assert (a.n_scored, a.tokens, a.scoring) == (b.n_scored, b.tokens, b.scoring)
    assert a.n_scored == (70 - 70 // 24 if scoring == "all" else 3 * (20 - 1 - 10))
    _close(b.nll, a.nll)


def test_hadamard_rotation_is_the_oracles_bit_for_bit():
    from quantref.cache import hadamard as np_hadamard
    from quantref_mlx.cache import hadamard as mx_hadamard

    x = np.random.default_rng(3).standard_normal((3, 20, 256)).astype(np.float32) * 7
    for n in (64, 128, 256):
        got = np.array(mx_hadamard(mx.array(x), n))
        np.testing.assert_array_equal(got.view(np.uint32), np_hadamard(x, n).view(np.uint32))


@pytest.mark.parametrize("kv", GGML_TYPES)
def test_ggml_scores_and_values_are_the_oracles(pair, kv):
    """Given the same stored blocks, llama.cpp's dot product (rotated query in Q8_0, integer
    block sums, float32 scale products) and the values read back agree: exact integer sums in
    both; only the float32 order of two per-block terms may differ, a few ulps."""
    m, mm = pair
    rng = np.random.default_rng(4)
    k = rng.standard_normal((2, 21, 64)).astype(np.float32)
    q = rng.standard_normal((2, 2, 5, 64)).astype(np.float32)
    np_cache, mx_cache = m.make_cache(kv), mm.make_cache(kv)
    np_cache.append(0, k, k)
    mx_cache.append(0, mx.array(k), mx.array(k))
    _close(mx_cache.scores(0, mx.array(q)), np_cache.scores(0, q), rel=1e-6)
    _close(mx_cache.values(0), np_cache.values(0), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The real default model
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(default_model_path):
    return quantref.load(default_model_path), quantref_mlx.load(default_model_path,
                                                                weights="float")


@pytest.mark.model
def test_default_model_logits_and_cache_agree_on_a_short_prompt(models):
    """The real model in both halves on a few tokens, then three decoded ones (the README's
    test command keeps this one: MLX's CPU wheel runs the whole real-model tests below in
    minutes on its reference BLAS). Tolerance as in the module docstring, relative to the
    logits' largest magnitude; an fp32 cache, because a compressed cache's stored bytes may
    differ in a last bit between the halves (see the read-side test above)."""
    m, mm = models
    ids = m.tokenizer.encode("The river runs under the old stone bridge", add_special=False)
    np_cache, mx_cache = m.make_cache("fp32"), mm.make_cache("fp32")
    _close(mm.forward(ids, mx_cache), m.forward(ids, np_cache))
    for token in (42, 7, 1000):
        _close(mm.forward([token], mx_cache), m.forward([token], np_cache))


@pytest.mark.model
@pytest.mark.slow
def test_default_model_fp32_perplexity_within_0_05_percent(models, ppl_1k_text):
    m, mm = models
    a = quantref.perplexity(m, ppl_1k_text)
    b = quantref_mlx.perplexity(mm, ppl_1k_text)
    assert a.n_scored == b.n_scored == 1115
    assert abs(b.ppl / a.ppl - 1) < 5e-4, (a.ppl, b.ppl)


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["turbo_kv_4b", "turbo_kv_5b"])
def test_default_model_turbo_perplexity_within_the_oracles_own_spread(models, ppl_1k_text, kind):
    """A compressed cache's perplexity moves by up to ~2% under 1-ulp changes of the input
    (codebook indices near a decision boundary flip and the flips cascade), so MLX must land
    within the spread that the oracle itself shows under such perturbations: within one full
    min-to-max range of the oracle's mean over 4 runs."""
    m, mm = models
    ids = m.tokenizer.encode(ppl_1k_text, add_special=False)
    runs = [quantref.perplexity(m, ids=ids, kv=kind, perturb=k).ppl for k in range(4)]
    spread = max(runs) - min(runs)
    assert spread > 0  # the chaos is real: otherwise this test would not need a spread
    got = quantref_mlx.perplexity(mm, ids=ids, kv=kind).ppl
    assert abs(got - np.mean(runs)) <= spread, (got, runs)
