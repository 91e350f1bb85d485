"""KV caches: stored bytes, read-back, the k-window, sizes, and the protocol with the model."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quantref
from quantref import quants, turbo_kv
from quantref.cache import KV_TYPES, hadamard, make_cache, rotation_sizes
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
    Q8, Q4 = quants.GGMLQuantizationType.Q8_0, quants.GGMLQuantizationType.Q4_0

    def ggml(x, t):  # llama.cpp's run-time quantizer, then its dequantizer
        return quants.dequantize(quants.quantize(x, t, runtime=True), t)

    want_k = {
        "fp32": lambda: k, "fp16": lambda: k.astype(np.float16).astype(np.float32),
        # head_dim 64: K rotated by a 64-point Hadamard, read back rotated again (H @ H = I)
        "q8_0": lambda: hadamard(ggml(hadamard(k, 64), Q8), 64),
        "q4_0": lambda: hadamard(ggml(hadamard(k, 64), Q4), 64),
        "q8_0_norot": lambda: ggml(k, Q8), "q4_0_norot": lambda: ggml(k, Q4),
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
                   "q8_0_norot": (8.5, 8.5), "q4_0_norot": (4.5, 4.5),
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


# ---------------------------------------------------------------------------------------------
# llama.cpp's quantized caches: the Hadamard rotation (PR #21038) and the CPU dot product
# ---------------------------------------------------------------------------------------------

def _ggml_gen_hadamard(n: int) -> np.ndarray:
    """ggml_gen_hadamard (``src/llama-kv-cache.cpp``), transcribed: the matrix llama.cpp fills."""
    h = np.zeros((n, n), np.float32)
    h[0, 0] = 1.0 / np.sqrt(np.float32(n))
    s = 1
    while s < n:
        for i in range(s):
            for j in range(s):
                val = h[i, j]
                h[i + s, j], h[i, j + s], h[i + s, j + s] = val, val, -val
        s *= 2
    return h


def _ggml_fwht_row(row: np.ndarray) -> np.ndarray:
    """ggml_compute_forward_fwht_impl (``ggml-cpu/ops.cpp``), transcribed element by element in
    float32 scalars: what llama.cpp's CPU backend computes for one row."""
    n = len(row)
    scale = np.float32(1.0) / np.sqrt(np.float32(n))
    dst = [np.float32(x) * scale for x in row]
    length = 1
    while length < n:
        for i in range(0, n, 2 * length):
            for j in range(length):
                u, v = dst[i + j], dst[i + length + j]
                dst[i + j], dst[i + length + j] = u + v, u - v  # FMA(u, v, -1) is exact u - v
        length *= 2
    return np.array(dst, np.float32)


@settings(max_examples=25, deadline=None)
@given(rows=hnp.arrays(np.float32, (3, 128),
                       elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False)),
       n=st.sampled_from([64, 128]))
def test_hadamard_is_ggmls_transform_bit_for_bit(rows, n):
    got = hadamard(rows, n)
    want = np.stack([np.concatenate([_ggml_fwht_row(r[i:i + n]) for i in range(0, 128, n)])
                     for r in rows])
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    # and it is the product with the matrix llama.cpp generates (float64 product: only the
    # float32 rounding of the butterflies differs, ~log2(n) ulps of the largest input)
    h = _ggml_gen_hadamard(n).astype(np.float64)
    exact = (rows.reshape(3, -1, n).astype(np.float64) @ h.T).reshape(3, 128)
    tol = 8 * np.finfo(np.float32).eps * max(1.0, float(np.abs(rows).max())) * np.sqrt(n)
    np.testing.assert_allclose(got, exact, rtol=0, atol=tol)


def test_hadamard_is_orthonormal_and_its_own_inverse():
    x = np.random.default_rng(8).standard_normal((4, 7, 256)).astype(np.float32)
    for n in (64, 128, 256):
        y = hadamard(x, n)
        # float32 butterflies: norms and the round trip hold to a few float32 ulps
        np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1),
                                   rtol=1e-6)
        np.testing.assert_allclose(hadamard(y, n), x, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(x, 48)
    with pytest.raises(ValueError, match="whole number"):
        hadamard(x[..., :96], 64)


def test_rotation_sizes_are_llama_cpps():
    """llama_kv_cache: K by the largest power of two >= 64 dividing head_dim, V by 64, none
    unless head_dim % 64 == 0 (build_input_k_rot / build_input_v_rot, attn_rot_k / _v)."""
    assert rotation_sizes(64) == (64, 64)
    assert rotation_sizes(128) == (128, 64)
    assert rotation_sizes(192) == (64, 64)
    assert rotation_sizes(256) == (256, 64)
    assert rotation_sizes(320) == (64, 64)
    assert rotation_sizes(96) == (0, 0) and rotation_sizes(32) == (0, 0)
    c = make_cache("q4_0", n_layers=1, n_kv_heads=1, head_dim=32)  # too small: not rotated
    assert (c.k_codec.rotation, c.v_codec.rotation) == (0, 0)
    c = make_cache("q8_0", n_layers=1, n_kv_heads=1, head_dim=128)
    assert (c.k_codec.rotation, c.v_codec.rotation) == (128, 64)
    c = make_cache("q8_0_norot", n_layers=1, n_kv_heads=1, head_dim=128)
    assert (c.k_codec.rotation, c.v_codec.rotation) == (0, 0)


def test_runtime_q8_0_rounds_ties_to_even_as_x86_does():
    """ggml-cpu's x86 quantize_row_q8_0 (what fills a Q8_0 KV cache and converts a query):
    x * (127 / max), _mm256_round_ps to nearest even; the reference rounds ties away from 0."""
    Q8 = quants.GGMLQuantizationType.Q8_0
    block = np.zeros(32, np.float32)
    block[:6] = [127, 2.5, -2.5, 3.5, 0.5, -1.5]  # max 127: the multiplier is exactly 1
    codes = lambda b: b.view(quants.BLOCK_Q8_0)["qs"][0]  # noqa: E731
    assert list(codes(quants.quantize(block, Q8, runtime=True))[:6]) == [127, 2, -2, 4, 0, -2]
    assert list(codes(quants.quantize(block, Q8))[:6]) == [127, 3, -3, 4, 1, -2]
    # the scale is the reference's: max / 127 in float16
    assert quants.quantize(block, Q8, runtime=True)[:2].tobytes() == \
        quants.quantize(block, Q8)[:2].tobytes()
    # Q4_0's run-time quantizer is the reference one
    x = np.random.default_rng(9).standard_normal((5, 64)).astype(np.float32)
    Q4 = quants.GGMLQuantizationType.Q4_0
    np.testing.assert_array_equal(quants.quantize(x, Q4, runtime=True), quants.quantize(x, Q4))


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float32, (4, 32), elements=st.floats(-1e3, 1e3, width=32)))
def test_runtime_q8_0_differs_from_the_reference_only_at_rounding_ties(blocks):
    Q8 = quants.GGMLQuantizationType.Q8_0
    rt = quants.quantize(blocks, Q8, runtime=True).view(quants.BLOCK_Q8_0)
    ref = quants.quantize(blocks, Q8).view(quants.BLOCK_Q8_0)
    np.testing.assert_array_equal(rt["d"], ref["d"])
    diff = rt["qs"].astype(int) - ref["qs"].astype(int)
    assert np.abs(diff).max() <= 1
    # where they differ, x * 127 / max sits on a tie, to the ulp by which 127 / max and
    # 1 / (max / 127) may differ: within a few float32 ulps of k + 1/2
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = (blocks.astype(np.float64) * 127 / amax)[:, None, :]
    frac = np.abs(np.abs(v) % 1 - 0.5)
    assert np.all(frac[diff != 0] <= 4 * np.finfo(np.float32).eps * 128)


@pytest.mark.parametrize("kv", ["q8_0", "q4_0", "q8_0_norot", "q4_0_norot"])
def test_ggml_scores_are_llama_cpps_cpu_dot_products(kv):
    """flash_attn_ext on the CPU: the query (rotated with K) is converted to Q8_0 by the run-time
    quantizer; ggml_vec_dot_q{8,4}_0_q8_0 then sums each 32-block's integer products exactly and
    scales it by d_q * d_k. Recomputed here row by row with Python integers and float64 sums."""
    k, v = _kv(10, 6)
    c = _cache(kv)
    _feed(c, k, v, chunk=6)
    q = np.random.default_rng(11).standard_normal((N_KV, 1, 3, HEAD_DIM)).astype(np.float32)
    got = c.scores(0, q)[:, 0]  # [N_KV, 3, 6]
    rot = 0 if kv.endswith("_norot") else 64
    qr = hadamard(q[:, 0], rot) if rot else q[:, 0]
    q8 = quants.quantize(qr, quants.GGMLQuantizationType.Q8_0, runtime=True)
    qb = q8.view(quants.BLOCK_Q8_0)  # [N_KV, 3, 2]
    (kbytes,), _ = c.stored(0)
    if kv.startswith("q8_0"):
        kb = kbytes.view(quants.BLOCK_Q8_0)
        k_codes = kb["qs"].astype(np.int64)
    else:
        kb = kbytes.view(quants.BLOCK_Q4_0)
        k_codes = np.concatenate([kb["qs"] & 15, kb["qs"] >> 4], axis=-1).astype(np.int64) - 8
    for h in range(N_KV):
        for i in range(3):
            for j in range(6):
                want, size = 0.0, 0.0
                for b in range(HEAD_DIM // 32):
                    isum = int(np.dot(qb["qs"][h, i, b].astype(np.int64), k_codes[h, j, b]))
                    d = np.float32(qb["d"][h, i, b]) * np.float32(kb["d"][h, j, b])
                    want += isum * float(d)
                    size += abs(isum * float(d))
                # float32 rounds each block's term and their sum, against a float64 sum: a few
                # float32 ulps of the terms' magnitude
                assert abs(got[h, i, j] - want) <= 4e-7 * max(1.0, size), (h, i, j)


def test_rotation_changes_what_is_stored_not_what_is_meant():
    """Rotated and unrotated caches store different blocks of the same keys; both read back
    near the keys, and rotation spreads an outlier channel over the block (llama.cpp's reason
    for it), so a q4_0 key with one large channel reads back far better rotated."""
    k, v = _kv(12, 16)
    k[..., 5] *= 40  # one outlier channel, as real keys have
    rot, plain = _cache("q4_0"), _cache("q4_0_norot")
    _feed(rot, k, v, chunk=16)
    _feed(plain, k, v, chunk=16)
    assert not np.array_equal(rot.stored(0)[0][0], plain.stored(0)[0][0])
    err_rot = np.abs(rot.keys(0) - k).mean()
    err_plain = np.abs(plain.keys(0) - k).mean()
    # measured 0.52-0.64 of the unrotated error over six seeds; 0.75 leaves room for the seed
    assert err_rot < 0.75 * err_plain, (err_rot, err_plain)


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
