"""The turbo_kv oracle against quant.cpp's golden vectors, the format document and properties.

Three independent references are used: the golden blocks / dequantized keys / scores that
quant.cpp's C code produced (``tests/data/turbo_kv_golden.npz`` and, when ``../shared`` exists,
``golden/turbo_kv_golden_realkv.npz``); the worked example of ``turbo_kv_format.md``; and a
scalar transcription of that document written here (Python loops over float32 scalars, one
rounding per operation), which covers what the golden files do not: ``d`` not a power of two,
``d > 128`` (chunks), short chunks, and the value formats.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantref import turbo_kv as tk

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parent.parent
F = np.float32
U = 2.0 ** -24  # float32 unit roundoff (round to nearest)

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# A scalar transcription of turbo_kv_format.md (the second, independent implementation)
# ---------------------------------------------------------------------------------------------

def ref_f16_trunc(v: np.float32) -> int:
    u = struct.unpack("<I", struct.pack("<f", v))[0]
    sign = (u >> 16) & 0x8000
    e = ((u >> 23) & 0xFF) - 127 + 15
    m = (u >> 13) & 0x3FF
    if e <= 0:
        return sign
    if e >= 31:
        return sign | 0x7C00
    return sign | (e << 10) | m


def ref_f16_decode(h: int) -> np.float32:
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        u = sign
    elif e == 31:
        u = sign | 0x7F800000 | (m << 13)
    else:
        u = sign | ((e - 15 + 127) << 23) | (m << 13)
    return np.frombuffer(struct.pack("<I", u), np.float32)[0]


def ref_rotate(v: list, d: int, inverse: bool = False) -> list:
    x = list(v)
    n2 = 1
    while n2 * 2 <= d:
        n2 *= 2
    s = F(1) / np.sqrt(F(n2))

    def signs():
        for i in range(0, n2, 2):
            x[i] = x[i] * F(-1)

    def butterfly():
        length = 1
        while length < n2:
            for g in range(0, n2, 2 * length):
                for j in range(length):
                    u, w = x[g + j], x[g + j + length]
                    x[g + j], x[g + j + length] = u + w, u - w
            length *= 2

    def scale():
        for i in range(n2):
            x[i] = x[i] * s

    steps = (scale, butterfly, signs) if inverse else (signs, butterfly, scale)
    for step in steps:
        step()
    return x


def ref_nearest(t: np.float32, levels) -> int:
    best, best_dist = 0, abs(t - levels[0])
    for j in range(1, len(levels)):
        dist = abs(t - levels[j])
        if dist < best_dist:
            best, best_dist = j, dist
    return best


def ref_quantize_chunk(x: np.ndarray, kind: str) -> bytes:
    c, cmax, b = tk.CENTROIDS[kind], tk.CENT_MAX[kind], tk.bits(kind)
    with np.errstate(all="ignore"):
        ss = F(0)
        for xi in x:
            ss = ss + xi * xi
        norm = np.sqrt(ss)
        inv = F(1) / norm if norm > F(1e-10) else F(0)
        r = ref_rotate([xi * inv for xi in x], len(x))
        m = max(abs(e) for e in r)
        if m < F(1e-10):
            m = F(1)
        s = cmax / m
        stream = 0
        for i, e in enumerate(r):
            stream |= ref_nearest(e * s, c) << (b * i)
    header = struct.pack("<HHHH", ref_f16_trunc(norm), 0, ref_f16_trunc(s), 0)
    return header + stream.to_bytes(tk.BLOCK * b // 8, "little")


def ref_dequantize_chunk(block: bytes, kind: str, d: int) -> np.ndarray:
    c, b = tk.CENTROIDS[kind], tk.bits(kind)
    norm16, _, s16, _ = struct.unpack_from("<HHHH", block)
    with np.errstate(all="ignore"):
        norm, s = ref_f16_decode(norm16), ref_f16_decode(s16)
        if s < F(1e-10):
            s = np.sqrt(F(d))
        step = F(1) / s
        stream = int.from_bytes(block[8:], "little")
        y = [c[(stream >> (b * i)) & ((1 << b) - 1)] * step for i in range(d)]
        return np.array([e * norm for e in ref_rotate(y, d, inverse=True)], np.float32)


def ref_quantize(x: np.ndarray, kind: str) -> np.ndarray:
    """``x float32 [d]`` -> ``uint8 [n_chunks, bb]``, chunk by chunk."""
    return np.stack([np.frombuffer(ref_quantize_chunk(x[lo:lo + 128], kind), np.uint8)
                     for lo in range(0, len(x), 128)])


def bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def keys_for(d: int, n: int, seed: int) -> np.ndarray:
    """Gaussian keys of assorted scales, with outlier channels and a zero vector."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * np.exp(rng.uniform(-4, 4, (n, 1)))
    x[1 % n, rng.integers(0, d, max(1, d // 32))] = 40.0
    x[-1] = 0.0
    return x.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Golden vectors (quant.cpp's own output)
# ---------------------------------------------------------------------------------------------

def _golden_cases(path: Path) -> list[tuple[Path, str, str]]:
    with np.load(path) as z:
        cases = sorted({k.split("/")[0] for k in z.files})
    return [(path, case, kind) for case in cases for kind in tk.KINDS]


def _check_golden(path: Path, case: str, kind: str) -> None:
    with np.load(path) as z:
        keys, queries = z[f"{case}/keys"], z[f"{case}/queries"]
        golden = {name: z[f"{case}/{kind}/{name}"]
                  for name in ("blocks", "dequant", "scores_fp32_codebook",
                               "scores_int8_codebook")}
    d = keys.shape[1]
    blocks = tk.quantize(keys, kind)
    assert blocks.shape == (len(keys), 1, tk.block_bytes(kind))
    mismatched = np.flatnonzero((blocks[:, 0] != golden["blocks"]).any(axis=1))
    assert mismatched.size == 0, f"blocks differ from quant.cpp at keys {mismatched[:10]}"
    deq = tk.dequantize(blocks, kind, d)
    assert bitwise_equal(deq, golden["dequant"]), "dequantized keys differ from quant.cpp"
    references = {
        "fp32_codebook": golden["scores_fp32_codebook"],
        "int8_codebook": golden["scores_int8_codebook"],
        # no dequant-path scores in the file: the exact dot product with its dequantized keys
        "dequant": (queries.astype(np.float64) @ golden["dequant"].astype(np.float64).T),
    }
    for path_name, ref in references.items():
        got = tk.scores(queries, blocks, kind, d, path=path_name)
        assert got.shape == ref.shape and got.dtype == np.float32
        # The format leaves the summation order of a dot product free; quant.cpp sums in
        # float32 (error ~ d * 2^-24 of the terms), so scores are compared to 1e-5 of the
        # row's largest |score| (the golden README's tolerance).
        scale = np.max(np.abs(ref), axis=1, keepdims=True)
        err = np.max(np.abs(got - ref) / scale)
        assert err <= 1e-5, f"{path_name} scores off by {err:.2e} of the row maximum"


@pytest.mark.parametrize("path,case,kind", _golden_cases(DATA / "turbo_kv_golden.npz"),
                         ids=lambda v: v if isinstance(v, str) else "golden")
def test_golden(path, case, kind):
    _check_golden(path, case, kind)


@pytest.mark.parametrize("kind", tk.KINDS)
def test_golden_realkv(shared_dir, kind):
    path = shared_dir / "golden" / "turbo_kv_golden_realkv.npz"
    if not path.exists():
        if os.environ.get("QUANTREF_REQUIRE_SHARED") == "1":
            pytest.fail(f"{path} is required (QUANTREF_REQUIRE_SHARED=1) but missing")
        pytest.skip(f"{path} not found")
    for _, case, k in _golden_cases(path):
        if k == kind:
            _check_golden(path, case, kind)


def test_golden_batched_layout_matches_flat():
    """Leading axes are only a layout: [4, 16, d] gives the flat case's blocks and scores."""
    with np.load(DATA / "turbo_kv_golden.npz") as z:
        keys, queries = z["gauss_d64/keys"], z["gauss_d64/queries"]
        golden = z["gauss_d64/turbo_kv_4b/blocks"]
    blocks = tk.quantize(keys.reshape(4, 16, 64), "turbo_kv_4b")
    assert np.array_equal(blocks.reshape(64, 72), golden)
    batched = tk.scores(np.broadcast_to(queries, (4, 4, 64)), blocks, "turbo_kv_4b", 64)
    flat = tk.scores(queries, blocks.reshape(64, 1, 72), "turbo_kv_4b", 64)
    assert np.array_equal(batched, flat.reshape(4, 4, 16).transpose(1, 0, 2))


# ---------------------------------------------------------------------------------------------
# The worked example of the format document
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,inv_std,head,sha", [
    ("turbo_kv_4b", 0x46B1, "af4d0000b1460000887898a7878888777847a758887c7788",
     "962198a1fc300ee9dac33b2e1ebf8b901dc4dd0219e355169ea9b02b35efc5b8"),
    ("turbo_kv_5b", 0x44E3, "af4d0000e344000010c617a59b0ec618a373f1b9e4666431",
     "13db4388259db61d7e16570af73d4009ad60fb434857d645fd81932eefda68ea"),
])
def test_worked_example(kind, inv_std, head, sha):
    x = ((np.arange(128) % 7) - 3).astype(np.float32)
    block = tk.quantize(x, kind)
    assert block.shape == (1, tk.block_bytes(kind))
    view = tk.as_blocks(block[0], kind)
    assert int(view["norm"]) == 0x4DAF and int(view["inv_std"]) == inv_std
    assert int(view["reserved0"]) == 0 and int(view["reserved1"]) == 0
    assert block[0, :24].tobytes().hex() == head
    assert hashlib.sha256(block[0].tobytes()).hexdigest() == sha


# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

def test_constants():
    assert tk.KINDS == ("turbo_kv_3b", "turbo_kv_4b", "turbo_kv_5b")
    assert tk.PATHS == ("int8_codebook", "fp32_codebook", "dequant")
    assert tk.BLOCK == 128
    assert [tk.block_bytes(k) for k in tk.KINDS] == [56, 72, 88]
    assert [tk.bits(k) for k in tk.KINDS] == [3, 4, 5]
    for kind in tk.KINDS:
        c = tk.CENTROIDS[kind]
        assert c.dtype == np.float32 and len(c) == 2 ** tk.bits(kind)
        assert np.all(np.diff(c) > 0) and np.array_equal(c, -c[::-1])
        assert tk.CENT_MAX[kind] == c[-1]
        assert tk.block_dtype(kind).itemsize == tk.block_bytes(kind)
        with pytest.raises(ValueError):
            c[0] = 0.0  # the tables are read-only


@pytest.mark.parametrize("kind", tk.KINDS)
def test_int8_tables_follow_the_rule(kind):
    """T[j] = (int)(v +- 0.5f) of v = C[j] * (127.0f / CENT_MAX), clamped to +-127 (C order)."""
    v = tk.CENTROIDS[kind] * (F(127.0) / tk.CENT_MAX[kind])
    t = np.trunc(np.where(v >= 0, v + F(0.5), v - F(0.5))).clip(-127, 127)
    assert np.array_equal(tk.INT8_TABLES[kind], t.astype(np.int8))
    assert tk.INT8_RECIP[kind] == tk.CENT_MAX[kind] / F(127)


# ---------------------------------------------------------------------------------------------
# Truncating fp16
# ---------------------------------------------------------------------------------------------

def test_f16_decode_all_patterns():
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = tk.f16_decode(h)
    ref = np.array([ref_f16_decode(int(v)) for v in h], np.float32)
    assert bitwise_equal(got, ref)
    exponent = (h >> 10) & 0x1F
    assert np.all(got[exponent == 0] == 0)  # subnormals flushed (keeping the sign)
    normal = (exponent != 0) & (exponent != 31)
    assert np.array_equal(got[normal], h[normal].view(np.float16).astype(np.float32))
    assert np.all(np.isinf(got[(exponent == 31) & ((h & 0x3FF) == 0)]))
    assert np.all(np.isnan(got[(exponent == 31) & ((h & 0x3FF) != 0)]))


_F16_EDGES = np.array([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.996, 65520.0, 1e6, -1e6,
                       2.0 ** -14, np.nextafter(F(2.0 ** -14), F(0)), 2.0 ** -24, 1e-30,
                       np.inf, -np.inf, np.nan, 0.1, 1 / 3], np.float32)


@given(hnp.arrays(np.uint32, 64, elements=st.integers(0, 2 ** 32 - 1)))
@SETTINGS
def test_f16_trunc_matches_reference(patterns):
    x = np.concatenate([patterns.view(np.float32), _F16_EDGES])
    got = tk.f16_trunc(x)
    assert got.dtype == np.uint16
    assert got.tolist() == [ref_f16_trunc(v) for v in x]
    finite = np.isfinite(x) & (np.abs(x) >= 2.0 ** -14) & (np.abs(x) < 65504)
    back = tk.f16_decode(got[finite])
    # rounding toward zero: never larger in magnitude, and less than one fp16 ulp (2^-10) lost
    assert np.all(np.abs(back) <= np.abs(x[finite]))
    assert np.all(np.abs(x[finite]) - np.abs(back) < np.abs(x[finite]) * 2.0 ** -10)


# ---------------------------------------------------------------------------------------------
# Rotation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 2, 3, 8, 40, 64, 96, 127, 128])
def test_rotate_matches_scalar_reference(d):
    x = keys_for(d, 3, seed=d)
    for v in x:
        assert bitwise_equal(tk.rotate(v, d), np.array(ref_rotate(list(v), d), np.float32))
        assert bitwise_equal(tk.inverse_rotate(v, d),
                             np.array(ref_rotate(list(v), d, inverse=True), np.float32))
    assert bitwise_equal(tk.rotate(x, d), np.stack([tk.rotate(v, d) for v in x]))


def test_rotate_passes_through_past_the_power_of_two():
    x = keys_for(96, 4, seed=1)
    for f in (tk.rotate, tk.inverse_rotate):
        y = f(x, 96)
        assert bitwise_equal(y[:, 64:], x[:, 64:])  # d = 96: 64 rotated, 32 not
        assert not np.array_equal(y[:, :64], x[:, :64])
    # a query zero-padded to 128 and rotated "using d" only touches the first n2 entries
    padded = np.zeros((4, 128), np.float32)
    padded[:, :96] = x
    assert bitwise_equal(tk.rotate(padded, 96)[:, :96], tk.rotate(x, 96))


@given(st.sampled_from([1, 2, 7, 16, 64, 96, 128]), st.data())
@SETTINGS
def test_rotation_inverse(d, data):
    """inverse_rotate(rotate(x)) == x up to the rounding of 2 * (log2(n2) + 3) float32 steps.

    Each butterfly stage multiplies the norm by sqrt(2) exactly and adds a relative error of at
    most u = 2^-24 per rounded add; the scale s = 1 / sqrtf(n2) carries up to 2u (two rounded
    operations) and its multiply one more u. So each direction is within (log2(n2) + 3) u of
    the exact orthogonal map in the 2-norm, the round trip within twice that (first order;
    1.01 covers the higher-order terms). Results that fall into float32's subnormal range are
    rounded absolutely (2^-150 per operation), hence the small absolute term.
    """
    x = data.draw(hnp.arrays(np.float32, (3, d), elements=st.floats(
        -2.0 ** 100, 2.0 ** 100, width=32, allow_subnormal=False)))
    n2 = 1 << (d.bit_length() - 1)
    k = n2.bit_length() - 1
    back = tk.inverse_rotate(tk.rotate(x, d), d).astype(np.float64)
    x64 = x.astype(np.float64)
    err = np.linalg.norm(back - x64, axis=1)
    bound = 1.01 * 2 * (k + 3) * U * np.linalg.norm(x64, axis=1) + 2 * (k + 3) * d * 2.0 ** -149
    assert np.all(err <= bound)
    assert bitwise_equal(back[:, n2:].astype(np.float32), x[:, n2:])


# ---------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------

@given(st.sampled_from([2, 3, 4, 5]), st.integers(0, 130), st.data())
@SETTINGS
def test_pack_unpack_round_trip(nbits, n, data):
    idx = data.draw(hnp.arrays(np.uint8, (2, n), elements=st.integers(0, 2 ** nbits - 1)))
    packed = tk.pack_indices(idx, nbits)
    assert packed.shape == (2, -(-n * nbits // 8)) and packed.dtype == np.uint8
    assert np.array_equal(tk.unpack_indices(packed, nbits, n), idx)
    # The layout: index i is stream bits [b*i, b*i + b), stream bit k = bit k%8 of byte k//8,
    # nothing else set.
    stream = np.unpackbits(packed, axis=-1, bitorder="little")
    weights = 1 << np.arange(nbits)
    assert np.array_equal((stream[:, :n * nbits].reshape(2, n, nbits) * weights).sum(-1), idx)
    assert not stream[:, n * nbits:].any()


def test_pack_4b_nibbles():
    packed = tk.pack_indices(np.array([1, 2, 3, 4, 5], np.uint8), 4)
    assert packed.tolist() == [0x21, 0x43, 0x05]  # even index in the low nibble


# ---------------------------------------------------------------------------------------------
# The codebook search
# ---------------------------------------------------------------------------------------------

def brute_nearest(t: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """argmin over [N, n_levels] of |t - C| in float32; argmin keeps the first minimum."""
    return np.argmin(np.abs(t[:, None] - levels[None, :]), axis=1)


ALL_LEVELS = [tk.CENTROIDS[k] for k in tk.KINDS] + [tk.Q2_LEVELS]


def _ordered(bits: np.ndarray) -> np.ndarray:
    """int64 float32 bit patterns -> a signed integer line in value order (both zeros at 0)."""
    return np.where(bits < 0x80000000, bits, 0x80000000 - bits)


def _near(v: np.float32, ulps: np.ndarray) -> np.ndarray:
    """The float32 values ``ulps`` representable steps away from ``v``, across zero too."""
    line = _ordered(np.array([v], np.float32).view(np.uint32).astype(np.int64)) + ulps
    bits = np.where(line >= 0, line, 0x80000000 - line)
    return bits.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("levels", ALL_LEVELS, ids=["3b", "4b", "5b", "q2"])
def test_nearest_centroid_dense(levels):
    """Every float32 within 3000 ulps of each midpoint, each level and 0, plus a wide sample."""
    ulps = np.arange(-3000, 3001)
    points = [F(0.0), F(-0.0)] + list(levels) + [F((a + b) / F(2)) for a, b in
                                                  zip(levels[:-1], levels[1:])]
    t = np.concatenate([_near(p, ulps) for p in points] + [
        np.random.default_rng(0).uniform(-3.5, 3.5, 200_000).astype(np.float32),
        # far out, rounding ties levels that are not neighbours (1e30: every distance is 1e30)
        np.array([-1e30, 1e30, 65535.996, 65536, -65536, 3e5, 1e7, -1e7, np.inf, -np.inf,
                  3.0, -3.0], np.float32)])
    assert np.array_equal(tk.nearest_centroid(t, levels), brute_nearest(t, levels))


@given(st.sampled_from(range(len(ALL_LEVELS))), st.data())
@SETTINGS
def test_nearest_centroid_property(which, data):
    levels = ALL_LEVELS[which]
    t = data.draw(hnp.arrays(np.float32, 50, elements=st.one_of(
        st.floats(-4, 4, width=32), st.floats(width=32, allow_nan=False))))
    # exact midpoints (when representable) and their neighbours: where ties go to the lower j
    j = data.draw(st.integers(0, len(levels) - 2))
    mid = F((levels[j] + levels[j + 1]) / F(2))
    t = np.concatenate([t, _near(mid, np.arange(-4, 5))])
    assert np.array_equal(tk.nearest_centroid(t, levels), brute_nearest(t, levels))


def test_nearest_centroid_ties_go_low():
    c = tk.CENTROIDS["turbo_kv_4b"]
    assert tk.nearest_centroid(np.array([0.0, -0.0], np.float32), c).tolist() == [7, 7]
    c5 = tk.CENTROIDS["turbo_kv_5b"]
    assert tk.nearest_centroid(np.array([0.0], np.float32), c5).tolist() == [15]


# ---------------------------------------------------------------------------------------------
# quantize / dequantize beyond the golden dimensions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 3, 40, 96, 100, 200, 300])
@pytest.mark.parametrize("kind", tk.KINDS)
def test_quantize_matches_scalar_reference(kind, d):
    """d < 128 (short block), d = 96 (64 rotated + 32 passed through), d > 128 (chunks)."""
    x = keys_for(d, 3, seed=d)
    blocks = tk.quantize(x, kind)
    assert blocks.shape == (3, -(-d // 128), tk.block_bytes(kind))
    deq = tk.dequantize(blocks, kind, d)
    for v, b, y in zip(x, blocks, deq):
        assert np.array_equal(b, ref_quantize(v, kind))
        ref = np.concatenate([ref_dequantize_chunk(b[c].tobytes(), kind, min(128, d - 128 * c))
                              for c in range(len(b))])
        assert bitwise_equal(y, ref)


@given(st.sampled_from(tk.KINDS), st.sampled_from([5, 64, 96, 130]), st.data())
@SETTINGS
def test_quantize_property_against_reference(kind, d, data):
    x = data.draw(hnp.arrays(np.float32, (1, d), elements=st.floats(-1e4, 1e4, width=32)))
    assert np.array_equal(tk.quantize(x, kind)[0], ref_quantize(x[0], kind))


@given(st.sampled_from(tk.KINDS), st.sampled_from([16, 64, 128, 200]), st.data())
@SETTINGS
def test_deterministic_and_layout_free(kind, d, data):
    x = data.draw(hnp.arrays(np.float32, (2, 3, d), elements=st.floats(-100, 100, width=32)))
    blocks = tk.quantize(x, kind)
    assert np.array_equal(blocks, tk.quantize(x.copy(), kind))
    rows = np.stack([tk.quantize(v, kind) for v in x.reshape(6, d)])
    assert np.array_equal(blocks.reshape(rows.shape), rows)
    assert bitwise_equal(tk.dequantize(blocks, kind, d).reshape(6, d),
                         np.stack([tk.dequantize(b, kind, d) for b in rows]))


def test_huge_and_zero_keys_behave_as_in_c():
    """x*x overflowing gives norm = inf in C too (header 0x7C00); a zero key decodes to zeros."""
    x = np.zeros((2, 64), np.float32)
    x[0, 3] = 3e38
    for kind in tk.KINDS:
        blocks = tk.quantize(x, kind)
        assert np.array_equal(blocks[:, 0], np.stack([ref_quantize(v, kind)[0] for v in x]))
        assert int(tk.as_blocks(blocks[0, 0], kind)["norm"]) == 0x7C00
        assert np.all(tk.dequantize(blocks[1:], kind, 64) == 0)


@given(st.sampled_from(tk.KINDS), st.sampled_from([16, 64, 96, 128]), st.data())
@SETTINGS
def test_dequantized_norm(kind, d, data):
    """What the format guarantees about ||dequantize(quantize(x))||.

    (a) The stored norm h is the float32 norm n32 truncated: n32 (1 - 2^-10) < h <= n32 (in
        fp16's normal range), and n32 is within (d + 2) u of the exact norm (sequential sum).
    (b) ||dequant|| = h ||y|| to within the inverse rotation's rounding ((log2 n2 + 3) u, see
        test_rotation_inverse) plus the final multiply (u), where y = C[idx] * (1 / s16) is the
        decoded rotated unit vector.
    (c) ||y|| is not 1: each rotated coordinate moves to its nearest level, at most half the
        widest level gap g away (in units of 1/s = m / CENT_MAX, m = max |r|), and 1/s16 exceeds
        1/s by less than 2^-10 relative. So | ||y|| - 1 | <= sqrt(d) m (g / (2 CENT_MAX) +
        2^-9) + 1e-5 (the 1e-5 covers the float32 rounding of r's norm, ~(d + 10) u).
    """
    x = data.draw(hnp.arrays(np.float32, d, elements=st.floats(-1e3, 1e3, width=32)))
    n32 = np.sqrt(np.cumsum(x * x, dtype=np.float32)[-1])
    assume(2.0 ** -14 <= n32 < 65504)
    block = tk.quantize(x, kind)  # [1, bb]
    header = tk.as_blocks(block[0], kind)
    h = tk.f16_decode(header["norm"])
    assert n32 * (1 - 2.0 ** -10) < h <= n32  # (a)
    exact = np.linalg.norm(x.astype(np.float64))
    assert abs(n32 - exact) <= (d + 2) * U * exact

    s16 = tk.f16_decode(header["inv_std"])
    idx = tk.unpack_indices(block[0, 8:], tk.bits(kind), d)
    y = tk.CENTROIDS[kind][idx] * (F(1) / s16)
    y_norm = np.linalg.norm(y.astype(np.float64))
    deq_norm = np.linalg.norm(tk.dequantize(block, kind, d).astype(np.float64))
    k = (1 << (d.bit_length() - 1)).bit_length() - 1
    assert abs(deq_norm - h * y_norm) <= 1.01 * (k + 4) * U * h * y_norm  # (b)

    m = np.max(np.abs(tk.rotate(x * (F(1) / n32), d)))
    gap = np.max(np.diff(tk.CENTROIDS[kind]))
    bound = math.sqrt(d) * m * (gap / (2 * tk.CENT_MAX[kind]) + 2.0 ** -9) + 1e-5
    assert abs(y_norm - 1) <= bound  # (c)


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------

@given(st.sampled_from(tk.KINDS), st.sampled_from([8, 64, 96, 128, 200]), st.data())
@SETTINGS
def test_dequant_and_fp32_paths_agree(kind, d, data):
    """The two exact paths differ only by float32 rounding, bounded per chunk c by

        ((log2 n2 + 3) u  [rotating q]  +  (log2 n2 + 4) u  [inverse rotation and * norm]
         + 2 u  [C * fl(1/s) vs C / s]) * ||q_c|| ||k_c||

    (k_c: the chunk's dequantized key) plus the float32 rounding of each result (u |score|).
    """
    q = data.draw(hnp.arrays(np.float32, (3, d), elements=st.floats(-10, 10, width=32)))
    x = keys_for(d, 5, seed=data.draw(st.integers(0, 1000)))
    blocks = tk.quantize(x, kind)
    s_deq = tk.scores(q, blocks, kind, d, path="dequant").astype(np.float64)
    s_fp32 = tk.scores(q, blocks, kind, d, path="fp32_codebook").astype(np.float64)
    keys = tk.dequantize(blocks, kind, d).astype(np.float64)
    tol = np.zeros_like(s_deq)
    for lo in range(0, d, 128):
        hi = min(d, lo + 128)
        k = (1 << ((hi - lo).bit_length() - 1)).bit_length() - 1
        q_norm = np.linalg.norm(q[:, lo:hi].astype(np.float64), axis=1)
        k_norm = np.linalg.norm(keys[:, lo:hi], axis=1)
        tol += (2 * k + 9) * U * np.outer(q_norm, k_norm)
        # subnormal intermediates round absolutely: 2^-150 per operation
        tiny = (k + 4) * math.sqrt(hi - lo) * 2.0 ** -149
        tol += tiny * (q_norm[:, None] + k_norm[None, :])
    tol = 1.01 * tol + U * (np.abs(s_deq) + np.abs(s_fp32))
    assert np.all(np.abs(s_deq - s_fp32) <= tol)


def test_int8_path_is_close_to_exact():
    """int8_codebook rounds each level to 1/127 of CENT_MAX: about 0.5% of a score (doc)."""
    x = keys_for(128, 64, seed=3)[:-1]
    q = np.random.default_rng(4).standard_normal((4, 128)).astype(np.float32)
    for kind in tk.KINDS:
        blocks = tk.quantize(x, kind)
        exact = tk.scores(q, blocks, kind, 128, path="fp32_codebook")
        approx = tk.scores(q, blocks, kind, 128, path="int8_codebook")
        rel = np.abs(approx - exact).max() / np.abs(exact).max()
        assert 0 < rel < 0.02


def test_scores_batch_axes_broadcast():
    x = keys_for(64, 12, seed=5).reshape(3, 4, 64)
    q = np.random.default_rng(6).standard_normal((3, 2, 64)).astype(np.float32)
    blocks = tk.quantize(x, "turbo_kv_3b")
    for path in tk.PATHS:
        got = tk.scores(q, blocks, "turbo_kv_3b", 64, path=path)
        assert got.shape == (3, 2, 4)
        for h in range(3):
            assert np.array_equal(got[h], tk.scores(q[h], blocks[h], "turbo_kv_3b", 64, path))
        shared_q = tk.scores(q[:1], blocks, "turbo_kv_3b", 64, path=path)  # [1] vs [3]
        assert np.array_equal(shared_q, np.stack(
            [tk.scores(q[0], blocks[h], "turbo_kv_3b", 64, path) for h in range(3)]))


# ---------------------------------------------------------------------------------------------
# Value formats
# ---------------------------------------------------------------------------------------------

def _roundf(v: np.float32) -> int:
    return int(math.copysign(math.floor(abs(float(v)) + 0.5), float(v)))


def ref_quantize_v(x: np.ndarray, v_type: str) -> bytes:
    """Transcription of quant.cpp's tq_quantize_row_q4 / _q2 (one group of <= 32 at a time)."""
    out = b""
    for g in range(0, len(x), 32):
        blk = x[g:g + 32]
        amax = F(0)
        for v in blk:
            if abs(v) > amax:
                amax = abs(v)
        dq = amax / (F(7.0) if v_type == "q4" else F(1.5104))
        inv = F(1) / dq if dq > F(1e-10) else F(0)
        if v_type == "q4":
            codes = [min(15, max(0, _roundf(v * inv) + 8)) for v in blk]
            packed = bytearray(16)
            for j, q in enumerate(codes):
                packed[j // 2] |= q << (4 * (j % 2))
        else:
            packed = bytearray(8)
            for j, v in enumerate(blk):
                packed[j // 4] |= ref_nearest(v * inv, tk.Q2_LEVELS) << (2 * (j % 4))
        out += struct.pack("<f", dq) + bytes(packed)
    return out


@pytest.mark.parametrize("d", [7, 32, 33, 64, 96])
@pytest.mark.parametrize("v_type", ["q4", "q2"])
def test_quantize_v_matches_reference(v_type, d):
    x = keys_for(d, 4, seed=d)
    data = tk.quantize_v(x, v_type)
    assert data.shape == (4, tk.v_bytes(v_type, d)) and data.dtype == np.uint8
    assert [bytes(r) for r in data] == [ref_quantize_v(v, v_type) for v in x]
    out = tk.dequantize_v(data, v_type, d)
    groups = data.reshape(4, -1, 20 if v_type == "q4" else 12)
    dq = np.repeat(groups[..., :4].copy().view("<f4")[..., 0], 32, axis=1)[:, :d]
    nbits = 4 if v_type == "q4" else 2
    codes = tk.unpack_indices(groups[..., 4:].copy(), nbits, 32).reshape(4, -1)[:, :d]
    levels = codes.astype(np.float32) - F(8) if v_type == "q4" else tk.Q2_LEVELS[codes]
    assert bitwise_equal(out, levels * dq)


def test_q4_rounds_half_away_from_zero():
    x = np.zeros(32, np.float32)
    x[:4] = [7.0, 2.5, -2.5, 0.5]  # absmax 7 -> dq = 1: codes 15, 3+8, -3+8, 1+8 (roundf)
    codes = tk.unpack_indices(tk.quantize_v(x, "q4")[4:8], 4, 4)
    assert codes.tolist() == [15, 11, 5, 9]
    assert tk.dequantize_v(tk.quantize_v(x, "q4"), "q4", 32)[:4].tolist() == [7, 3, -3, 1]


@given(st.sampled_from(["q4", "q2"]), st.integers(1, 80), st.data())
@SETTINGS
def test_v_error_bound(v_type, d, data):
    """q4 rounds to the grid of step dq: |x - x'| <= dq/2 (1e-5 of slack for the float32
    rounding of x * (1/dq) and of the decode). q2 stays within the outer level: |x'| <= absmax.
    A group whose dq is <= 1e-10 is not scaled (quant.cpp's guard): it decodes to
    0 (q4) or to -0.4528 * dq (q2's nearest level to 0), i.e. |x'| <= dq."""
    x = data.draw(hnp.arrays(np.float32, (2, d), elements=st.floats(-1e3, 1e3, width=32)))
    out = tk.dequantize_v(tk.quantize_v(x, v_type), v_type, d)
    assert out.shape == x.shape
    for lo in range(0, d, 32):
        blk, got = x[:, lo:lo + 32], out[:, lo:lo + 32].astype(np.float64)
        amax = np.abs(blk).max(axis=1, keepdims=True).astype(np.float64)
        dq = amax / (7 if v_type == "q4" else 1.5104)
        guarded = dq <= 1e-10
        assert np.all(np.abs(got) <= np.where(guarded, dq, np.inf))
        if v_type == "q4":
            ok = np.abs(got - blk) <= dq / 2 * (1 + 1e-5)
        else:
            ok = np.abs(got) <= amax * (1 + 1e-5)
        assert np.all(ok | guarded)


def test_fp16_fp32_values():
    x = keys_for(64, 3, seed=9)
    f16 = tk.quantize_v(x, "fp16")
    assert f16.shape == (3, 128) and np.array_equal(f16.view("<f2"), x.astype(np.float16))
    assert bitwise_equal(tk.dequantize_v(f16, "fp16", 64), x.astype(np.float16).astype(np.float32))
    f32 = tk.quantize_v(x, "fp32")
    assert bitwise_equal(tk.dequantize_v(f32, "fp32", 64), x)
    assert [tk.v_bytes(t, 64) for t in tk.V_TYPES] == [128, 256, 40, 24]
    assert [tk.v_bytes(t, 40) for t in ("q4", "q2")] == [40, 24]


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_input_errors():
    x = np.ones((4, 64), np.float32)
    bad = x.copy()
    bad[3, 17] = np.nan
    with pytest.raises(ValueError, match=r"x\[3, 17\] is nan"):
        tk.quantize(bad, "turbo_kv_4b")
    bad[3, 17] = -np.inf
    with pytest.raises(ValueError, match=r"x\[3, 17\] is -inf"):
        tk.quantize_v(bad, "q4")
    with pytest.raises(ValueError, match="unknown turbo_kv kind"):
        tk.quantize(x, "turbo_kv_2b")
    with pytest.raises(TypeError, match="float64"):
        tk.quantize(x.astype(np.float64), "turbo_kv_4b")
    with pytest.raises(TypeError, match="int"):
        tk.quantize(x.astype(np.int32), "turbo_kv_4b")
    with pytest.raises(ValueError, match="d >= 1"):
        tk.quantize(np.zeros((3, 0), np.float32), "turbo_kv_4b")
    # float16 is converted exactly, so it quantizes like its float32 value
    half = keys_for(64, 3, seed=2).astype(np.float16)
    assert np.array_equal(tk.quantize(half, "turbo_kv_4b"),
                          tk.quantize(half.astype(np.float32), "turbo_kv_4b"))


def test_block_errors():
    blocks = tk.quantize(keys_for(100, 3, seed=1), "turbo_kv_4b")  # [3, 1, 72]
    with pytest.raises(ValueError, match="d must be positive"):
        tk.dequantize(blocks, "turbo_kv_4b", 0)
    with pytest.raises(ValueError, match="d must be positive"):
        tk.dequantize(blocks, "turbo_kv_4b", -5)
    with pytest.raises(TypeError, match="d must be an int"):
        tk.dequantize(blocks, "turbo_kv_4b", 100.0)
    with pytest.raises(ValueError, match="needs 2 block"):
        tk.dequantize(blocks, "turbo_kv_4b", 200)
    with pytest.raises(ValueError, match=r"blocks\[0, 0\] has non-zero index bytes past "
                                         r"element 64"):
        tk.dequantize(blocks, "turbo_kv_4b", 64)  # quantized with d = 100
    with pytest.raises(ValueError, match="72 bytes; got last axis 88"):
        tk.dequantize(np.zeros((3, 1, 88), np.uint8), "turbo_kv_4b", 100)
    with pytest.raises(TypeError, match="uint8"):
        tk.dequantize(blocks.astype(np.int16), "turbo_kv_4b", 100)
    reserved = blocks.copy()
    reserved[2, 0, 6] = 1
    with pytest.raises(ValueError, match=r"blocks\[2, 0\] has non-zero reserved"):
        tk.dequantize(reserved, "turbo_kv_4b", 100)
    q = np.ones((2, 100), np.float32)
    with pytest.raises(ValueError, match="unknown scores path"):
        tk.scores(q, blocks, "turbo_kv_4b", 100, path="int4")
    with pytest.raises(ValueError, match=r"q must be \[\.\.\., M, d=100\]"):
        tk.scores(q[:, :64], blocks, "turbo_kv_4b", 100)
    q[1, 5] = np.inf
    with pytest.raises(ValueError, match=r"q\[1, 5\] is inf"):
        tk.scores(q, blocks, "turbo_kv_4b", 100)
    with pytest.raises(ValueError, match="do not broadcast"):
        tk.scores(np.ones((2, 1, 100), np.float32), blocks[None].repeat(3, 0),
                  "turbo_kv_4b", 100)


def test_value_and_packing_errors():
    with pytest.raises(ValueError, match="unknown value type"):
        tk.v_bytes("q8", 64)
    with pytest.raises(ValueError, match="take 40 bytes"):
        tk.dequantize_v(np.zeros((2, 39), np.uint8), "q4", 64)
    with pytest.raises(ValueError, match="in 0..7"):
        tk.pack_indices(np.array([8], np.uint8), 3)
    with pytest.raises(ValueError, match="need 12 bytes"):
        tk.unpack_indices(np.zeros(11, np.uint8), 3, 32)
    with pytest.raises(TypeError, match="float32"):
        tk.f16_trunc(np.ones(3))
    with pytest.raises(ValueError, match="longer than"):
        tk.rotate(np.ones(8, np.float32), 9)


# ---------------------------------------------------------------------------------------------
# docs/oracle.md: its code blocks run
# ---------------------------------------------------------------------------------------------

def test_oracle_doc_examples_run():
    text = (ROOT / "docs" / "oracle.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/oracle.md has no python examples"
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, "docs/oracle.md", "exec"), namespace)
