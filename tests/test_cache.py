"""KV caches: stored bytes, read-back, the k-window, sizes, and the protocol with the model."""

from __future__ import annotations

import numpy as np
import pytest

import quantref
from quantref import quants, turbo_kv
from quantref.cache import KV_TYPES, make_cache
from quantref.testing import write_tiny_llama

N_LAYERS, N_KV, HEAD_DIM = 2, 2, 64


def _kv(seed: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N_KV, T, HEAD_DIM)).astype(np.float32),
            rng.standard_normal((N_KV, T, HEAD_DIM)).astype(np.float32))


def _cache(kv: str, **opts):
    return make_cache(kv, n_layers=N_LAYERS, n_kv_heads=N_KV, head_dim=HEAD_DIM, **opts)


def _feed(cache, k, v, chunk: int) -> None:
    for s in range(0, k.shape[1], chunk):
        for layer in range(N_LAYERS):
            cache.append(layer, k[:, s:s + chunk], v[:, s:s + chunk])
        cache.commit(k[:, s:s + chunk].shape[1])


@pytest.mark.parametrize("kv", KV_TYPES)
def test_chunked_and_one_at_a_time_store_identical_bytes(kv):
    k, v = _kv(0, 23)
    a, b = _cache(kv), _cache(kv)
    _feed(a, k, v, chunk=23)
    _feed(b, k, v, chunk=1)
    for layer in range(N_LAYERS):
        for pa, pb in zip(sum(a.stored(layer), ()), sum(b.stored(layer), ())):
            assert pa.dtype == pb.dtype
            np.testing.assert_array_equal(pa.view(np.uint8), pb.view(np.uint8))


@pytest.mark.parametrize("kv", KV_TYPES)
def test_reads_back_through_the_formats_own_decoder(kv):
    k, v = _kv(1, 9)
    c = _cache(kv)
    _feed(c, k, v, chunk=4)
    (kp, *_), _ = c.stored(0)
    want_k = {
        "fp32": lambda: k, "fp16": lambda: k.astype(np.float16).astype(np.float32),
        "q8_0": lambda: quants.dequantize(quants.quantize(k, quants.GGMLQuantizationType.Q8_0),
                                          quants.GGMLQuantizationType.Q8_0),
        "q4_0": lambda: quants.dequantize(quants.quantize(k, quants.GGMLQuantizationType.Q4_0),
                                          quants.GGMLQuantizationType.Q4_0),
    }
    if kv.startswith("turbo_kv_"):
        np.testing.assert_array_equal(kp, turbo_kv.quantize(k, kv))
        np.testing.assert_array_equal(c.keys(0), turbo_kv.dequantize(turbo_kv.quantize(k, kv), kv,
                                                                     HEAD_DIM))
        np.testing.assert_array_equal(c.values(0), v.astype(np.float16).astype(np.float32))
    elif kv in want_k:
        np.testing.assert_array_equal(c.keys(0), want_k[kv]())
    else:  # mlx affine: fp16 input, groups of 64
        w, s, b = quants.quantize_affine(k.astype(np.float16), int(kv[-1]), 64)
        np.testing.assert_array_equal(c.keys(0), quants.dequantize_affine(w, s, b, int(kv[-1]), 64)
                                      .astype(np.float32))


@pytest.mark.parametrize("path", turbo_kv.PATHS)
def test_turbo_scores_are_the_oracles(path):
    k, v = _kv(2, 11)
    c = _cache("turbo_kv_4b", score_path=path)
    _feed(c, k, v, chunk=11)
    q = np.random.default_rng(3).standard_normal((N_KV, 3, 5, HEAD_DIM)).astype(np.float32)
    for layer in range(N_LAYERS):
        c.append(layer, k[:, :0], v[:, :0])  # nothing new: just ask
    got = c.scores(0, q)
    want = turbo_kv.scores(q.reshape(N_KV, 15, HEAD_DIM), turbo_kv.quantize(k, "turbo_kv_4b"),
                           "turbo_kv_4b", HEAD_DIM, path=path).reshape(N_KV, 3, 5, 11)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("window", [1, 3, 8, 40])
@pytest.mark.parametrize("chunk", [1, 4, 25])
def test_k_window_uses_float32_for_the_newest_keys(window, chunk):
    """For the query at position p, key j is read in float32 iff p - W < j <= p."""
    T = 25
    k, v = _kv(4, T)
    rng = np.random.default_rng(5)
    q_all = rng.standard_normal((N_KV, 2, T, HEAD_DIM)).astype(np.float32)
    blocks = turbo_kv.quantize(k, "turbo_kv_3b")
    c = _cache("turbo_kv_3b", k_window=window)
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        for layer in range(N_LAYERS):
            c.append(layer, k[:, s:e], v[:, s:e])
        got = c.scores(1, q_all[:, :, s:e])  # [N_KV, 2, e - s, e]
        for t in range(s, e):
            comp = turbo_kv.scores(q_all[:, :, t], blocks[:, :e], "turbo_kv_3b", HEAD_DIM)
            exact = q_all[:, :, t] @ k[:, :e].transpose(0, 2, 1)
            use_exact = (t - np.arange(e) < window) & (np.arange(e) <= t)
            want = np.where(use_exact, exact, comp)
            # the same dot products over other row sets: BLAS blocking differs (float32
            # reassociation, ~1e-6 of these O(10) scores)
            row = got[:, :, t - s]
            np.testing.assert_allclose(row, want, rtol=0, atol=1e-5)
            # and the window really reads float32 keys: far closer to them than the blocks
            err_exact = np.abs(row - exact)[..., use_exact].max()
            err_comp = np.abs(comp - exact)[..., use_exact].max()
            assert err_exact < 1e-5 < err_comp, (err_exact, err_comp)
        c.commit(e - s)


def test_interrupted_pass_leaves_the_committed_state():
    k, v = _kv(6, 10)
    c = _cache("turbo_kv_4b", k_window=4)
    _feed(c, k[:, :6], v[:, :6], chunk=6)
    c.append(0, k[:, 6:9] * 100, v[:, 6:9])  # a pass interrupted after layer 0
    assert c.length == 6
    _feed(c, k[:, 6:], v[:, 6:], chunk=4)  # the retry overwrites the uncommitted rows
    ref = _cache("turbo_kv_4b", k_window=4)
    _feed(ref, k, v, chunk=10)
    for layer in range(N_LAYERS):
        for pa, pb in zip(sum(c.stored(layer), ()), sum(ref.stored(layer), ())):
            np.testing.assert_array_equal(pa, pb)


def test_sizes_are_the_true_stored_sizes():
    k, v = _kv(7, 10)
    elems = N_LAYERS * N_KV * HEAD_DIM
    expect_bits = {"fp32": (32, 32), "fp16": (16, 16), "q8_0": (8.5, 8.5), "q4_0": (4.5, 4.5),
                   "mlx_q8": (8.5, 8.5), "mlx_q4": (4.5, 4.5),
                   # a 128-element block per 64-dim head: half of it unused, still stored
                   "turbo_kv_3b": (56 * 8 / 64, 16), "turbo_kv_4b": (72 * 8 / 64, 16),
                   "turbo_kv_5b": (88 * 8 / 64, 16)}
    for kv in KV_TYPES:
        c = _cache(kv)
        _feed(c, k, v, chunk=10)
        assert c.bits_per_element == expect_bits[kv], kv
        assert c.bytes_per_token == elems * sum(expect_bits[kv]) / 8
        stored = sum(p.nbytes for layer in range(N_LAYERS) for part in c.stored(layer)
                     for p in part)
        assert c.nbytes == stored == 10 * c.bytes_per_token, kv
    c = _cache("turbo_kv_4b", v="q4", k_window=4)
    _feed(c, k, v, chunk=10)
    assert c.bits_per_element[1] == turbo_kv.v_bytes("q4", HEAD_DIM) * 8 / HEAD_DIM
    assert c.nbytes == 10 * c.bytes_per_token + c.window_bytes


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown kv type 'q3'"):
        _cache("q3")
    with pytest.raises(ValueError, match="apply to turbo_kv"):
        _cache("fp16", v="q4")
    with pytest.raises(ValueError, match="unknown v type"):
        _cache("turbo_kv_4b", v="q3")
    with pytest.raises(ValueError, match="score_path"):
        _cache("turbo_kv_4b", score_path="fast")
    with pytest.raises(ValueError, match="k_window"):
        _cache("turbo_kv_4b", k_window=-1)
    with pytest.raises(ValueError, match="divisible by 64"):
        make_cache("mlx_q4", n_layers=1, n_kv_heads=1, head_dim=32)


def test_the_model_stores_exactly_the_encoding_of_its_keys(tmp_path):
    """In the model, prefill and one-token decode each store the codec's encoding of the keys
    and values the model handed over, bytes for bytes. (The float keys of the two runs may
    differ in their last bits, since BLAS rounds a matrix-matrix and a matrix-vector product
    differently; identical keys giving identical blocks is the first test of this file.)"""
    m = quantref.load(write_tiny_llama(tmp_path / "t.gguf", n_layers=2, dim=128, n_heads=2,
                                       n_kv_heads=1, hidden_dim=128))
    ids = [4, 70, 200, 12, 12, 99, 260, 5]
    for kv in KV_TYPES:
        for chunk in (len(ids), 1):
            cache = m.make_cache(kv)
            seen: dict[int, list] = {0: [], 1: []}
            append = cache.append

            def recording_append(layer, k, v, _append=append, _seen=seen):
                _seen[layer].append((k.copy(), v.copy()))
                _append(layer, k, v)

            cache.append = recording_append
            for s in range(0, len(ids), chunk):
                m.forward(ids[s:s + chunk], cache)
            for layer in range(2):
                k = np.concatenate([kv_[0] for kv_ in seen[layer]], axis=1)
                v = np.concatenate([kv_[1] for kv_ in seen[layer]], axis=1)
                k_parts, v_parts = cache.stored(layer)
                for got, want in zip(k_parts + v_parts,
                                     cache.k_codec.encode(k) + cache.v_codec.encode(v)):
                    np.testing.assert_array_equal(got, want)
