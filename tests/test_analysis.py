"""Compression-quality analysis: the capture is what the model hands its cache, the figures are
their definitions (checked against an independent recomputation), fp32 measures zero, and the
orderings a researcher expects hold on a tiny model and on the real default model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quantref
from quantref import analysis, turbo_kv
from quantref.analysis import Capture, CacheErrors
from quantref.cache import KV_TYPES
from quantref.model import rms_norm, rope, rope_tables
from quantref.testing import write_tiny_llama

TEXT = ("The ferry crossed the river twice a day in winter, and the ferryman kept a ledger of "
        "every crossing, the weather, and the names of those who paid in apples. ")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # head_dim 64: every cache type applies (mlx groups of 64, ggml blocks of 32, turbo blocks)
    return quantref.load(write_tiny_llama(tmp_path_factory.mktemp("m") / "t.gguf", dim=128,
                                          n_heads=2, n_kv_heads=1, hidden_dim=128, seed=5,
                                          context_length=256))


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory):
    # 4 query heads on 2 KV heads, to see the grouping (head_dim 32: no mlx types here)
    return quantref.load(write_tiny_llama(tmp_path_factory.mktemp("g") / "g.gguf", dim=128,
                                          n_heads=4, n_kv_heads=2, hidden_dim=128, seed=6,
                                          n_layers=3, context_length=256))


@pytest.fixture(scope="module")
def cap(tiny):
    return analysis.capture(tiny, TEXT, batch=32)


@pytest.fixture(scope="module")
def errors(cap):
    return {kv: analysis.measure(cap, kv) for kv in KV_TYPES}


def _synthetic(seed: int, n_layers: int, n_kv: int, n_groups: int, T: int, d: int = 64,
               scale: float = 1.0) -> Capture:
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return Capture(keys=normal(n_layers, n_kv, T, d), values=normal(n_layers, n_kv, T, d),
                   queries=normal(n_layers, n_kv, n_groups, T, d))


# ---------------------------------------------------------------------------------------------
# The capture
# ---------------------------------------------------------------------------------------------

def test_capture_holds_the_queries_keys_and_values_the_model_computes(tiny):
    """Recomputed here layer by layer from the weights (one chunk), against a capture fed in
    chunks of 7 tokens."""
    a, w = tiny.args, tiny.weights
    cap = analysis.capture(tiny, TEXT, batch=7)
    ids = tiny.tokenizer.encode(TEXT, add_special=False)
    T = len(ids)
    assert cap.keys.shape == (a.n_layers, a.n_kv_heads, T, a.head_dim) == cap.values.shape
    assert cap.queries.shape == (a.n_layers, a.n_kv_heads, a.n_groups, T, a.head_dim)
    np.testing.assert_array_equal(cap.ids, ids)

    cos, sin = rope_tables(np.arange(T), a)
    cache = tiny.make_cache("fp32")
    x = w.token_embd[np.asarray(ids)]
    for layer, lw in enumerate(w.layers):
        h = rms_norm(x, lw.attn_norm, a.norm_eps)
        q = rope((h @ lw.wq.T).reshape(T, a.n_heads, a.head_dim), cos, sin)
        k = rope((h @ lw.wk.T).reshape(T, a.n_kv_heads, a.head_dim), cos, sin)
        v = (h @ lw.wv.T).reshape(T, a.n_kv_heads, a.head_dim)
        # chunks of 7 vs one chunk of T: BLAS may sum in another order, and later layers see
        # inputs that differ by that much: agreement to 1e-5 (float32 is 1.2e-7 per operation)
        np.testing.assert_allclose(cap.keys[layer], k.transpose(1, 0, 2), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cap.values[layer], v.transpose(1, 0, 2), rtol=1e-5, atol=1e-5)
        # query head j belongs to KV head j // n_groups
        np.testing.assert_allclose(
            cap.queries[layer].reshape(a.n_heads, T, a.head_dim), q.transpose(1, 0, 2),
            rtol=1e-5, atol=1e-5)
        x = tiny.block(layer, x, cache, cos, sin)


def test_capture_is_exactly_what_an_fp32_cache_stores(tiny):
    ids = tiny.tokenizer.encode(TEXT, add_special=False)
    cap = analysis.capture(tiny, ids=ids, batch=256)
    cache = tiny.make_cache("fp32")
    tiny.forward(ids, cache)
    for layer in range(tiny.args.n_layers):
        np.testing.assert_array_equal(cap.keys[layer], cache.keys(layer))
        np.testing.assert_array_equal(cap.values[layer], cache.values(layer))


def test_capture_puts_bos_first_when_the_metadata_asks_and_truncates(tmp_path):
    m = quantref.load(write_tiny_llama(tmp_path / "bos.gguf", add_bos=True, seed=2))
    cap = analysis.capture(m, TEXT, max_tokens=10)
    assert cap.n_tokens == 10
    assert cap.ids[0] == m.tokenizer.bos_id
    np.testing.assert_array_equal(cap.ids[1:], m.tokenizer.encode(TEXT, add_special=False)[:9])


def test_capture_refuses_bad_arguments(tiny):
    with pytest.raises(ValueError, match="exactly one of"):
        analysis.capture(tiny)
    with pytest.raises(ValueError, match="exactly one of"):
        analysis.capture(tiny, TEXT, ids=[1, 2])
    with pytest.raises(ValueError, match="context length 256"):
        analysis.capture(tiny, ids=[5] * 300)
    with pytest.raises(ValueError, match="max_tokens"):
        analysis.capture(tiny, TEXT, max_tokens=0)
    with pytest.raises(ValueError, match="no tokens"):
        analysis.capture(tiny, "")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        analysis.capture(tiny, ids=[10**6])


def test_capture_arrays_are_checked():
    good = _synthetic(0, 1, 1, 2, 4)
    with pytest.raises(ValueError, match="Capture.keys must be a float32"):
        Capture(good.keys.astype(np.float64), good.values, good.queries)
    with pytest.raises(ValueError, match="Capture.values has shape"):
        Capture(good.keys, good.values[:, :, :3], good.queries)
    with pytest.raises(ValueError, match="Capture.queries has shape"):
        Capture(good.keys, good.values, good.queries[..., :32])
    bad = good.values.copy()
    bad[0, 0, 1, 2] = np.nan
    with pytest.raises(ValueError, match="Capture.values holds non-finite"):
        Capture(good.keys, bad, good.queries)
    with pytest.raises(ValueError, match="ids has shape"):
        Capture(good.keys, good.values, good.queries, ids=np.arange(5))


# ---------------------------------------------------------------------------------------------
# The figures on the tiny model
# ---------------------------------------------------------------------------------------------

def _shapes_ok(e: CacheErrors, n_layers: int, n_kv: int, n_heads: int) -> None:
    for name in CacheErrors.KV_HEAD_FIELDS:
        assert getattr(e, name).shape == (n_layers, n_kv), name
    for name in CacheErrors.HEAD_FIELDS:
        assert getattr(e, name).shape == (n_layers, n_heads), name


def test_fp32_cache_measures_exactly_zero(cap, errors):
    e = errors["fp32"]
    _shapes_ok(e, cap.n_layers, cap.n_kv_heads, cap.n_heads)
    for name in ("key_rel_mse", "value_rel_mse", "score_rel_rms", "score_rel_rms_kv",
                 "attn_kl", "attn_kl_kv", "output_rel_rms", "output_rel_rms_kv"):
        np.testing.assert_array_equal(getattr(e, name), 0.0, err_msg=name)
    np.testing.assert_array_equal(e.key_cos, 1.0)
    np.testing.assert_array_equal(e.value_cos, 1.0)
    assert (e.k_bits, e.v_bits, e.kv, e.n_tokens) == (32.0, 32.0, "fp32", cap.n_tokens)


def test_fp16_errors_are_tiny_but_not_zero(errors):
    e = errors["fp16"]
    # fp16 rounding is at most 2^-11 relative per element, so a relative MSE is <= 2^-22
    for name in ("key_rel_mse", "value_rel_mse"):
        a = getattr(e, name)
        assert (a > 0).all() and (a <= 2.0 ** -22).all(), (name, a)
    assert (e.key_cos < 1).all() and (e.key_cos > 1 - 2.0 ** -21).all()
    assert (e.score_rel_rms > 0).all() and (e.score_rel_rms < 1e-2).all()
    assert (e.attn_kl > 0).all() and (e.attn_kl < 1e-5).all()


def test_fewer_turbo_bits_mean_larger_errors(errors):
    e3, e4, e5 = (errors[f"turbo_kv_{b}b"] for b in (3, 4, 5))
    for name in ("key_rel_mse", "score_rel_rms", "attn_kl", "output_rel_rms"):
        m3, m4, m5 = (getattr(e, name).mean() for e in (e3, e4, e5))
        assert m3 > m4 > m5 > 0, (name, m3, m4, m5)
    assert e3.key_cos.mean() < e5.key_cos.mean() < 1
    # the values are fp16 for every turbo K type
    np.testing.assert_array_equal(e3.value_rel_mse, errors["fp16"].value_rel_mse)
    assert errors["q4_0"].attn_kl.mean() > errors["q8_0"].attn_kl.mean()
    assert errors["mlx_q4"].attn_kl.mean() > errors["mlx_q8"].attn_kl.mean()


def test_one_layer_and_head_match_a_direct_recomputation(cap):
    """turbo_kv_3b keys (int8_codebook scores) and q4 values, layer 1, KV head 0, through the
    oracle's own functions and plain per-position loops in float64."""
    kind, layer, h = "turbo_kv_3b", 1, 0
    e = analysis.measure(cap, kind, v="q4")
    k, v = cap.keys[layer, h], cap.values[layer, h]  # [T, d]
    T, d = k.shape
    k_hat = turbo_kv.dequantize(turbo_kv.quantize(k, kind), kind, d).astype(np.float64)
    v_hat = turbo_kv.dequantize_v(turbo_kv.quantize_v(v, "q4"), "q4", d).astype(np.float64)
    k64, v64 = k.astype(np.float64), v.astype(np.float64)

    def rel_mse(x, x_hat):
        return sum(float(np.sum((x_hat[t] - x[t]) ** 2)) for t in range(T)) / \
            sum(float(np.sum(x[t] ** 2)) for t in range(T))

    def mean_cos(x, x_hat):
        return np.mean([x[t] @ x_hat[t] / (np.linalg.norm(x[t]) * np.linalg.norm(x_hat[t]))
                        for t in range(T)])

    # float64 sums in another order: 1e-10 relative
    assert math.isclose(e.key_rel_mse[layer, h], rel_mse(k64, k_hat), rel_tol=1e-10)
    assert math.isclose(e.value_rel_mse[layer, h], rel_mse(v64, v_hat), rel_tol=1e-10)
    assert math.isclose(e.key_cos[layer, h], mean_cos(k64, k_hat), rel_tol=1e-12)
    assert math.isclose(e.value_cos[layer, h], mean_cos(v64, v_hat), rel_tol=1e-12)

    blocks = turbo_kv.quantize(k, kind)
    for g in range(cap.n_groups):
        q = cap.queries[layer, h, g]  # [T, d]
        s_hat = turbo_kv.scores(q, blocks, kind, d, path="int8_codebook").astype(np.float64)
        s = q.astype(np.float64) @ k64.T
        num = den = kl = out_num = out_den = 0.0
        for t in range(T):
            ref, got = s[t, :t + 1], s_hat[t, :t + 1]
            num += float(np.sum((got - ref) ** 2))
            den += float(np.sum(ref ** 2))
            p = np.exp(ref / math.sqrt(d) - np.max(ref / math.sqrt(d)))
            p /= p.sum()
            r = np.exp(got / math.sqrt(d) - np.max(got / math.sqrt(d)))
            r /= r.sum()
            kl += float(np.sum(p * np.log(p / r)))
            o, o_hat = p @ v64[:t + 1], r @ v_hat[:t + 1]
            out_num += float(np.sum((o_hat - o) ** 2))
            out_den += float(np.sum(o ** 2))
        j = h * cap.n_groups + g
        # the analysis' reference scores are float32 (the fp32 cache's, scaled in float32 as
        # the model does), ours float64: about 1e-7 relative per score, 1e-5 on the figures
        assert math.isclose(e.score_rel_rms[layer, j], math.sqrt(num / den), rel_tol=1e-5)
        assert math.isclose(e.attn_kl[layer, j], kl / T, rel_tol=1e-5)
        assert math.isclose(e.output_rel_rms[layer, j], math.sqrt(out_num / out_den),
                            rel_tol=1e-5)


def test_a_k_window_over_every_query_makes_the_scores_exact(cap, errors):
    e = analysis.measure(cap, "turbo_kv_3b", k_window=cap.n_tokens, v="fp32")
    # the stored blocks are the same; every score is read from the float32 window instead
    np.testing.assert_array_equal(e.key_rel_mse, errors["turbo_kv_3b"].key_rel_mse)
    np.testing.assert_array_equal(e.score_rel_rms, 0.0)
    np.testing.assert_array_equal(e.attn_kl, 0.0)
    np.testing.assert_array_equal(e.output_rel_rms, 0.0)  # and float32 values
    partial = analysis.measure(cap, "turbo_kv_3b", k_window=8)
    assert 0 < partial.score_rel_rms.mean() < errors["turbo_kv_3b"].score_rel_rms.mean()
    assert e.kv == f"turbo_kv_3b/v=fp32/w={cap.n_tokens}" and partial.options["k_window"] == 8


def test_query_heads_are_grouped_on_their_kv_head(tiny_gqa):
    cap = analysis.capture(tiny_gqa, TEXT)
    assert (cap.n_kv_heads, cap.n_groups, cap.n_heads) == (2, 2, 4)
    e = analysis.measure(cap, "q4_0")
    _shapes_ok(e, 3, 2, 4)
    np.testing.assert_allclose(e.attn_kl_kv, e.attn_kl.reshape(3, 2, 2).mean(axis=2),
                               rtol=1e-15)
    # pooled over a KV head's query heads: between the smallest and the largest of them
    by_group = e.score_rel_rms.reshape(3, 2, 2)
    assert (e.score_rel_rms_kv >= by_group.min(axis=2) * (1 - 1e-12)).all()
    assert (e.score_rel_rms_kv <= by_group.max(axis=2) * (1 + 1e-12)).all()

    rows = e.to_rows()
    assert len(rows) == 6 and rows[3]["layer"] == 1 and rows[3]["kv_head"] == 1
    assert rows[3]["key_rel_mse"] == e.key_rel_mse[1, 1]
    assert rows[3]["attn_kl"] == e.attn_kl_kv[1, 1]
    head_rows = e.to_rows(by="head")
    assert len(head_rows) == 12
    assert head_rows[7] == {"kv": "q4_0", "layer": 1, "head": 3, "kv_head": 1,
                            "score_rel_rms": e.score_rel_rms[1, 3],
                            "attn_kl": e.attn_kl[1, 3], "output_rel_rms": e.output_rel_rms[1, 3]}
    with pytest.raises(ValueError, match="by must be"):
        e.to_rows(by="layer")
    s = e.summary()
    assert s["kv"] == "q4_0" and s["attn_kl"] == pytest.approx(e.attn_kl.mean(), rel=1e-15)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_layers=st.integers(1, 2), n_kv=st.integers(1, 2),
       n_groups=st.integers(1, 2), T=st.integers(1, 12), log_scale=st.floats(-2, 2),
       kv=st.sampled_from(KV_TYPES))
def test_invariants_on_random_captures(seed, n_layers, n_kv, n_groups, T, log_scale, kv):
    cap = _synthetic(seed, n_layers, n_kv, n_groups, T, scale=10.0 ** log_scale)
    e = analysis.measure(cap, kv)
    _shapes_ok(e, n_layers, n_kv, n_kv * n_groups)
    for name in CacheErrors.KV_HEAD_FIELDS + CacheErrors.HEAD_FIELDS:
        assert np.isfinite(getattr(e, name)).all(), name
    for name in ("key_rel_mse", "value_rel_mse", "score_rel_rms", "output_rel_rms"):
        assert (getattr(e, name) >= 0).all()
    # cosines of float64 sums, rounding allowed for
    assert (np.abs(e.key_cos) <= 1 + 1e-12).all() and (np.abs(e.value_cos) <= 1 + 1e-12).all()
    assert (e.attn_kl >= -1e-12).all()  # a KL is >= 0; float64 rounding of near-equal rows
    if T == 1:  # one key: every softmax is [1.0]
        np.testing.assert_array_equal(e.attn_kl, 0.0)

    # KV heads are measured independently: one head's capture alone gives its figures (to
    # float32 rounding: BLAS may order a batched matmul's sums differently)
    h = n_kv - 1
    alone = analysis.measure(Capture(cap.keys[:, h:h + 1], cap.values[:, h:h + 1],
                                     cap.queries[:, h:h + 1]), kv)
    for name in CacheErrors.KV_HEAD_FIELDS:
        np.testing.assert_allclose(getattr(alone, name)[:, 0], getattr(e, name)[:, h],
                                   rtol=1e-5, atol=1e-12, err_msg=name)
    for name in CacheErrors.HEAD_FIELDS:
        np.testing.assert_allclose(getattr(alone, name),
                                   getattr(e, name)[:, h * n_groups:(h + 1) * n_groups],
                                   rtol=1e-5, atol=1e-12, err_msg=name)


def test_zero_keys_and_values_are_measured_without_nans():
    cap = _synthetic(0, 1, 1, 1, 5)
    zero = Capture(np.zeros_like(cap.keys), np.zeros_like(cap.values), cap.queries)
    for kv in ("fp32", "q8_0", "turbo_kv_4b"):
        e = analysis.measure(zero, kv)
        assert e.key_rel_mse[0, 0] == 0 and e.key_cos[0, 0] == 1, kv  # stored exactly
        assert e.attn_kl[0, 0] == 0 and e.score_rel_rms[0, 0] == 0


def test_measure_refuses_unknown_configurations(cap):
    with pytest.raises(ValueError, match="unknown kv type 'q3_k'"):
        analysis.measure(cap, "q3_k")
    with pytest.raises(ValueError, match="apply to turbo_kv"):
        analysis.measure(cap, "q8_0", v="q4")
    with pytest.raises(ValueError, match=r"unknown cache option\(s\) \['bits'\]"):
        analysis.measure_many(cap, [{"kv": "q8_0", "bits": 4}])
    with pytest.raises(ValueError, match="mapping with 'kv'"):
        analysis.cache_config({"v": "q4"})
    got = analysis.measure_many(cap, ["q8_0", {"kv": "turbo_kv_4b", "v": "q4"}])
    assert [e.kv for e in got] == ["q8_0", "turbo_kv_4b/v=q4"]


# ---------------------------------------------------------------------------------------------
# Perplexity against bits, and memory
# ---------------------------------------------------------------------------------------------

def test_bits_vs_quality_rows_are_the_perplexity_runs(tiny):
    text = TEXT[:80]
    rows = analysis.bits_vs_quality(tiny, text, configs=["fp16", {"kv": "turbo_kv_3b",
                                                                  "v": "q4"}], batch=16)
    assert [r["kv"] for r in rows] == ["fp32", "fp16", "turbo_kv_3b/v=q4"]
    ref = quantref.perplexity(tiny, text, keep_logprobs=True, batch=16)
    direct = quantref.perplexity(tiny, text, kv="turbo_kv_3b", v="q4", reference=ref, batch=16)
    assert rows[0]["ppl"] == ref.ppl and rows[0]["mean_kl"] == 0 and rows[0]["top1_agree"] == 1
    assert rows[2]["ppl"] == direct.ppl and rows[2]["mean_kl"] == direct.mean_kl
    assert rows[2]["top1_agree"] == direct.top1_agree
    assert rows[2]["ppl_ratio"] == direct.ppl / ref.ppl
    assert (rows[2]["k_bits"], rows[2]["v_bits"]) == direct.kv_bits
    assert rows[2]["bits"] == sum(direct.kv_bits) / 2
    assert rows[2]["bytes_per_token"] == direct.kv_bytes_per_token
    assert 0 < rows[1]["mean_kl"] < rows[2]["mean_kl"]
    again = analysis.bits_vs_quality(tiny, text, configs=["fp16"], batch=16, reference=ref)
    assert again[1]["mean_kl"] == rows[1]["mean_kl"]
    with pytest.raises(ValueError, match="keep_logprobs"):
        analysis.bits_vs_quality(tiny, text, configs=[], reference=direct)


def test_bits_vs_quality_spread_is_the_perturbed_runs(tiny):
    """``perturb=3``: each row's min..max is over the exact run and the runs under
    ``perplexity(perturb=1)`` and ``(perturb=2)``, KL measured from the exact fp32 run."""
    text = TEXT[:80]
    rows = analysis.bits_vs_quality(tiny, text, configs=["turbo_kv_3b"], batch=16, perturb=3)
    ref = quantref.perplexity(tiny, text, keep_logprobs=True, batch=16)
    for row, kv in zip(rows, ("fp32", "turbo_kv_3b")):
        runs = [quantref.perplexity(tiny, text, kv=kv, reference=ref, batch=16, perturb=k)
                for k in range(3)]
        assert row["ppl"] == runs[0].ppl
        assert (row["ppl_min"], row["ppl_max"]) == (min(r.ppl for r in runs),
                                                    max(r.ppl for r in runs))
        assert (row["kl_min"], row["kl_max"]) == (min(r.mean_kl for r in runs),
                                                  max(r.mean_kl for r in runs))
    assert rows[0]["kl_min"] == 0.0 < rows[0]["kl_max"]  # a 1-ulp change moves fp32 a little
    assert rows[1]["ppl_min"] < rows[1]["ppl_max"]
    single = analysis.bits_vs_quality(tiny, text, configs=["turbo_kv_3b"], batch=16)
    assert single[1]["ppl_min"] == single[1]["ppl"] == single[1]["ppl_max"]
    with pytest.raises(ValueError, match="perturb"):
        analysis.bits_vs_quality(tiny, text, configs=[], perturb=0)


MEMORY_CONFIGS = [("fp32", {}), ("fp16", {}), ("q8_0", {}), ("q4_0", {}), ("mlx_q8", {}),
                  ("mlx_q4", {}), ("turbo_kv_3b", {}), ("turbo_kv_5b", {"v": "q2"}),
                  ("turbo_kv_4b", {"v": "q4", "k_window": 16})]


@pytest.mark.parametrize("kv,options", MEMORY_CONFIGS)
def test_kv_memory_is_the_size_of_a_filled_cache(tiny, kv, options):
    a = tiny.args
    rng = np.random.default_rng(0)
    for T in (5, 40):
        cache = tiny.make_cache(kv, **options)
        for layer in range(a.n_layers):
            cache.append(layer, *rng.standard_normal((2, a.n_kv_heads, T, a.head_dim),
                                                     dtype=np.float32))
        cache.commit(T)
        assert analysis.kv_memory(tiny, kv, T, **options) == cache.nbytes
        assert analysis.kv_memory(a, kv, T, **options) == cache.nbytes
    assert analysis.memory_per_token(tiny, kv, **options) == cache.bytes_per_token


def test_memory_table_and_its_arguments(tiny):
    rows = analysis.memory_table(tiny, contexts=(4096, 32768))
    labels = [r["kv"] for r in rows]
    assert labels[0] == "fp32" and labels[-1] == "turbo_kv_4b/v=q4" and len(rows) == 10
    fp32 = rows[0]
    assert fp32["bytes_per_token"] == tiny.args.kv_bytes_per_token(4.0)
    assert fp32["bytes_at_32768"] == 32768 * tiny.args.kv_bytes_per_token(4.0)
    by = {r["kv"]: r for r in rows}
    assert by["q8_0"]["bytes_at_4096"] == 4096 * by["q8_0"]["bytes_per_token"]
    assert by["q4_0"]["bytes_per_token"] < by["q8_0"]["bytes_per_token"] < fp32["bytes_per_token"]
    assert analysis.kv_memory(tiny, "fp16", 0) == 0
    with pytest.raises(ValueError, match="context must be"):
        analysis.kv_memory(tiny, "fp16", -1)


# ---------------------------------------------------------------------------------------------
# The real default model
# ---------------------------------------------------------------------------------------------

# Lloyd-Max distortion of a unit Gaussian quantized to 8 / 16 / 32 levels (Max, 1960).
LLOYD_MAX_GAUSSIAN = {"turbo_kv_3b": 0.03454, "turbo_kv_4b": 0.009497, "turbo_kv_5b": 0.002499}


@pytest.mark.model
@pytest.mark.slow  # a capture and seven measurements of the real model: a minute of CPU time
def test_real_model_figures(default_model_path):
    m = quantref.load(default_model_path)
    text = (Path(quantref.__file__).parent / "data" / "default_text.txt").read_text("utf-8")
    cap = analysis.capture(m, text, max_tokens=256)
    a = m.args
    assert cap.keys.shape == (a.n_layers, a.n_kv_heads, 256, a.head_dim)
    cache = m.make_cache("fp32")
    m.forward(cap.ids, cache)
    for layer in (0, a.n_layers - 1):  # the capture is what the model stores
        np.testing.assert_array_equal(cap.keys[layer], cache.keys(layer))

    e = {c: analysis.measure(cap, c) for c in ("fp32", "q8_0", "q4_0", *turbo_kv.KINDS)}
    np.testing.assert_array_equal(e["fp32"].attn_kl, 0.0)
    for kind, distortion in LLOYD_MAX_GAUSSIAN.items():
        # the rotation makes a key's coordinates near-Gaussian, so the relative MSE is near the
        # Lloyd-Max distortion of its codebook; a factor of 2 leaves room for the lighter tails
        # of a rotated 64-element vector and the fp16 norm and scale
        assert distortion / 2 < e[kind].key_rel_mse.mean() < distortion * 2, kind
    # every layer and head: fewer bits, larger key error
    assert (e["turbo_kv_3b"].key_rel_mse > e["turbo_kv_4b"].key_rel_mse).all()
    assert (e["turbo_kv_4b"].key_rel_mse > e["turbo_kv_5b"].key_rel_mse).all()
    kl = {c: r.attn_kl.mean() for c, r in e.items()}
    assert kl["turbo_kv_3b"] > kl["turbo_kv_4b"] > kl["turbo_kv_5b"] > kl["q8_0"] > 0
    assert kl["q4_0"] > kl["q8_0"]
