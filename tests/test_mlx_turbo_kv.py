"""quantref_mlx.turbo_kv against the NumPy oracle: the same bytes, bits and (to rounding) scores.

The oracle (``quantref.turbo_kv``) is itself matched to quant.cpp's golden vectors and to a scalar
transcription of the format in ``tests/test_turbo_kv.py``; here the MLX module is compared with
it on those golden vectors and on hypothesis-drawn keys (d = 64, 96, 128, 200, 256 and small d;
Gaussian, outlier channels, tiny norms, overflowing squares, zeros, raw float32 patterns, and
keys built so that their scaled rotated coordinates sit within a few ulps of the codebook
decision points). The tests run on MLX's default device: the MLX-operation graph on a CPU, the
custom kernels for keys on a GPU. The laziness tests prove that building the graph of a decode
step evaluates nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

mx = pytest.importorskip("mlx.core")

from quantref import turbo_kv as tk  # noqa: E402
from quantref_mlx import turbo_kv as mk  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
U = 2.0 ** -24  # float32 unit roundoff
DIMS = (64, 96, 128, 200, 256)
SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """The same float32 bits everywhere (signed zeros included); any NaN matches any NaN,
    because quant.cpp's format gives NaN payloads no meaning."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and bool(np.all((a.view(np.uint32) == b.view(np.uint32))
                                              | (np.isnan(a) & np.isnan(b))))


def ev(a) -> np.ndarray:
    return np.array(a)


def nudge(t: np.ndarray, ulps: np.ndarray) -> np.ndarray:
    """``t`` moved by ``ulps`` float32 steps (through zero: -0.0 and +0.0 are one step apart)."""
    bits = np.asarray(t, np.float32).view(np.int32).astype(np.int64)
    key = np.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits) + ulps  # float order
    return np.where(key < 0, (-(key + 1)) | -0x80000000, key).astype(np.int32).view(np.float32)


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------

def structured_keys(pattern: str, n: int, d: int, seed: int) -> np.ndarray:
    """``float32 [n, d]`` keys of one pattern (see the module docstring)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    if pattern == "normal":
        x *= np.exp(rng.uniform(-6, 6, (n, 1)))
    elif pattern == "outliers":
        x[np.arange(n)[:, None], rng.integers(0, d, (n, max(1, d // 32)))] = 40.0
    elif pattern == "tiny":  # squares subnormal or underflowing; norms below the 1e-10 guard
        x *= 10.0 ** rng.uniform(-45, -9, (n, 1))
    elif pattern == "huge":  # squares overflow: norm inf
        x *= 10.0 ** rng.uniform(18, 37, (n, 1))
    elif pattern == "zeros":
        x[:] = 0.0
        x[1::2, rng.integers(0, d)] = -0.0
    with np.errstate(over="ignore", under="ignore"):
        return x.astype(np.float32)


def near_decision_points(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    """Keys whose scaled rotated coordinates ``r * s`` land within a few ulps of a midpoint
    between two levels: a midpoint +- up to 40 ulps per coordinate, one coordinate on the
    outermost level (so that ``s`` maps the rest where they were put), inverse-rotated, scaled."""
    rng = np.random.default_rng(seed)
    c = tk.CENTROIDS[kind]
    mids = ((c[:-1].astype(np.float64) + c[1:]) / 2).astype(np.float32)
    t = mids[rng.integers(0, len(mids), (n, d))]
    t = nudge(t, rng.integers(-40, 41, (n, d)))
    n2 = 1 << (d.bit_length() - 1)
    t[:, rng.integers(0, n2)] = tk.CENT_MAX[kind]
    unit = t / np.linalg.norm(t, axis=1, keepdims=True).astype(np.float32)
    scale = np.exp(rng.uniform(-5, 5, (n, 1))).astype(np.float32)
    return tk.inverse_rotate(unit, d) * scale


@st.composite
def keys(draw, dims=DIMS):
    d = draw(st.sampled_from(dims) | st.integers(1, 140))
    n = draw(st.integers(1, 12))
    pattern = draw(st.sampled_from(["normal", "outliers", "tiny", "huge", "zeros", "raw"]))
    if pattern == "raw":  # any finite float32 bit pattern, subnormals included
        return draw(hnp.arrays(np.float32, (n, d), elements=st.floats(
            width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)))
    return structured_keys(pattern, n, d, draw(st.integers(0, 2 ** 32 - 1)))


# ---------------------------------------------------------------------------------------------
# Score tolerance
# ---------------------------------------------------------------------------------------------

def magnitudes(q: np.ndarray, blocks: np.ndarray, kind: str, d: int, path: str):
    """float64 ``(|q'|, |k'|)``: the absolute values of the two factors the path dots."""
    if path == "dequant":
        return np.abs(q.astype(np.float64)), np.abs(tk.dequantize(blocks, kind, d)
                                                     .astype(np.float64))
    view = tk.as_blocks(blocks, kind)
    if path == "fp32_codebook":
        table = np.abs(tk.CENTROIDS[kind].astype(np.float64))
    else:
        table = np.abs(tk.INT8_TABLES[kind].astype(np.float64)) * float(tk.INT8_RECIP[kind])
    qs, ks = [], []
    for c, lo in enumerate(range(0, d, tk.BLOCK)):
        cd = min(tk.BLOCK, d - lo)
        norm = tk.f16_decode(view["norm"][..., c]).astype(np.float64)
        s = tk.f16_decode(view["inv_std"][..., c]).astype(np.float64)
        s = np.where(s < 1e-10, float(np.sqrt(np.float32(cd))), s)
        idx = tk.unpack_indices(np.ascontiguousarray(blocks[..., c, tk.HEADER_BYTES:]),
                                tk.bits(kind), cd)
        with np.errstate(invalid="ignore", divide="ignore"):
            ks.append(table[idx] * (norm / s)[..., None])
        qs.append(np.abs(tk.rotate(q[..., lo:lo + cd], cd).astype(np.float64)))
    return np.concatenate(qs, -1), np.concatenate(ks, -1)


def assert_scores_close(got: np.ndarray, q: np.ndarray, blocks: np.ndarray, kind: str, d: int,
                        path: str) -> None:
    """Within ``(d + 8) u (|q'| @ |k'|.T)`` of the oracle: the float32 dot product of ``d``
    terms in any order is within ``d u`` of the exact one, relative to the sum of
    ``|q'_i k'_i|``; the keys' float32 factor ``norm * (R / s)`` and ``T[idx] * factor`` add
    three roundings, the oracle's own rounding of its float64 result one; 8 covers those and
    the second-order terms. The rotated queries are the oracle's, bit for bit."""
    ref = tk.scores(q, blocks, kind, d, path)
    qa, ka = magnitudes(q, blocks, kind, d, path)
    bound = (d + 8) * U * np.matmul(qa, np.swapaxes(ka, -1, -2))
    assert got.shape == ref.shape and got.dtype == np.float32
    finite = np.isfinite(ref) & np.isfinite(bound)
    err = np.abs(got.astype(np.float64) - ref)
    assert np.all(err[finite] <= bound[finite]), \
        f"{path} scores off by up to {np.max((err - bound)[finite]):.3e} beyond the bound"
    assert np.array_equal(np.isfinite(got), np.isfinite(ref))


# ---------------------------------------------------------------------------------------------
# Constants: the oracle's own objects
# ---------------------------------------------------------------------------------------------

def test_constants_are_the_oracles():
    for name in ("BLOCK", "HEADER_BYTES", "KINDS", "PATHS", "CENTROIDS", "CENT_MAX",
                 "INT8_TABLES", "INT8_RECIP", "V_TYPES", "V_GROUP", "Q2_LEVELS", "bits",
                 "block_bytes", "v_bytes", "block_dtype"):
        assert getattr(mk, name) is getattr(tk, name), name
    assert set(mk.__all__) == set(tk.__all__) - {"as_blocks"}


# ---------------------------------------------------------------------------------------------
# Golden vectors of quant.cpp
# ---------------------------------------------------------------------------------------------

def _golden_cases(path: Path) -> list[tuple[Path, str, str]]:
    with np.load(path) as z:
        cases = sorted({k.split("/")[0] for k in z.files})
    return [(path, case, kind) for case in cases for kind in tk.KINDS]


def _check_golden(path, case: str, kind: str) -> None:
    with np.load(path) as z:
        keys_, queries = z[f"{case}/keys"], z[f"{case}/queries"]
        golden, golden_deq = z[f"{case}/{kind}/blocks"], z[f"{case}/{kind}/dequant"]
        golden_scores = {p: z[f"{case}/{kind}/scores_{p}"]
                         for p in ("fp32_codebook", "int8_codebook")}
    d = keys_.shape[1]
    blocks = ev(mk.quantize(mx.array(keys_), kind))
    assert blocks.shape == (len(keys_), 1, tk.block_bytes(kind))
    bad = np.flatnonzero((blocks[:, 0] != golden).any(axis=1))
    assert bad.size == 0, f"blocks differ from quant.cpp at keys {bad[:10]}"
    assert same_floats(ev(mk.dequantize(mx.array(golden[:, None]), kind, d)), golden_deq)
    for p in tk.PATHS:
        got = ev(mk.scores(mx.array(queries), mx.array(blocks), kind, d, p))
        assert_scores_close(got, queries, blocks, kind, d, p)
        if p in golden_scores:  # and quant.cpp's own float32 scores, to the oracle's tolerance
            ref = golden_scores[p]
            scale = np.max(np.abs(ref), axis=1, keepdims=True)
            assert np.max(np.abs(got - ref) / scale) <= 1e-5  # docs/oracle.md: golden tolerance


@pytest.mark.parametrize("path,case,kind", _golden_cases(DATA / "turbo_kv_golden.npz"),
                         ids=lambda v: v if isinstance(v, str) else "golden")
def test_golden(path, case, kind):
    _check_golden(path, case, kind)


def test_golden_realkv(shared_dir):
    path = shared_dir / "golden" / "turbo_kv_golden_realkv.npz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    for _, case, kind in _golden_cases(path):
        _check_golden(path, case, kind)


def test_worked_example():
    """The format document's example, ``x[i] = (i mod 7) - 3``: quant.cpp's bytes."""
    x = mx.array(((np.arange(128) % 7) - 3).astype(np.float32))
    assert ev(mk.quantize(x, "turbo_kv_4b"))[0, :24].tobytes().hex() == \
        "af4d0000b1460000887898a7878888777847a758887c7788"
    assert ev(mk.quantize(x, "turbo_kv_5b"))[0, :24].tobytes().hex() == \
        "af4d0000e344000010c617a59b0ec618a373f1b9e4666431"


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize: byte and bit identity
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", tk.KINDS)
@SETTINGS
@given(x=keys())
def test_quantize_is_the_oracles(kind, x):
    d = x.shape[1]
    ref = tk.quantize(x, kind)
    blocks = ev(mk.quantize(mx.array(x), kind))
    assert blocks.dtype == np.uint8 and np.array_equal(blocks, ref)
    assert same_floats(ev(mk.dequantize(mx.array(ref), kind, d)), tk.dequantize(ref, kind, d))


def test_cpu_cumsum_is_the_sequential_sum():
    """The CPU path's norm rests on this: MLX's CPU cumsum adds left to right in float32, like
    quant.cpp's loop (a pairwise or reversed order differs on these sums of wide-ranging terms)."""
    rng = np.random.default_rng(3)
    sq = (rng.standard_normal((4000, 128)) * np.exp(rng.uniform(-30, 30, (4000, 128))))
    sq = (sq * sq).astype(np.float32)
    with mx.stream(mx.cpu):
        got = ev(mx.cumsum(mx.array(sq), axis=-1)[..., -1])
    assert same_floats(got, np.cumsum(sq, axis=1, dtype=np.float32)[:, -1])
    assert not same_floats(got, np.cumsum(sq[:, ::-1], axis=1, dtype=np.float32)[:, -1])


@pytest.mark.parametrize("kind", tk.KINDS)
@pytest.mark.parametrize("d", DIMS)
def test_quantize_structured_patterns(kind, d):
    """Every pattern at once, in one batch of leading shape [6, 2, 5]."""
    x = np.concatenate([structured_keys(p, 10, d, seed)
                        for seed, p in enumerate(["normal", "outliers", "tiny", "huge",
                                                  "zeros"])] + [near_decision_points(kind, 10,
                                                                                     d, 9)])
    x = x.reshape(6, 2, 5, d)
    ref = tk.quantize(x, kind)
    blocks = mk.quantize(mx.array(x), kind)
    assert blocks.shape == (6, 2, 5, -(-d // 128), tk.block_bytes(kind))
    assert np.array_equal(ev(blocks), ref)
    assert same_floats(ev(mk.dequantize(blocks, kind, d)), tk.dequantize(ref, kind, d))


@pytest.mark.parametrize("kind", tk.KINDS)
@pytest.mark.parametrize("d", (64, 128, 200))
def test_values_near_codebook_midpoints(kind, d):
    """Coordinates within a few ulps of the decision points: the codebook search must break
    near-ties exactly as quant.cpp's float32 scan does."""
    x = near_decision_points(kind, 64, d, seed=d)
    # the construction works: most scaled coordinates (computed as the oracle does) lie
    # within 100 ulps of a midpoint, so the comparison below exercises near-ties
    rows = x.reshape(-1, d)[:, :min(d, 128)]
    ss = np.cumsum(rows * rows, axis=1, dtype=np.float32)[:, -1]
    r = tk.rotate(rows * (np.float32(1) / np.sqrt(ss))[:, None], rows.shape[1])
    t = r * (tk.CENT_MAX[kind] / np.abs(r).max(axis=1))[:, None]
    c = tk.CENTROIDS[kind]
    mids = ((c[:-1].astype(np.float64) + c[1:]) / 2).astype(np.float32)
    ulp = np.spacing(np.abs(t)).astype(np.float64)
    near = np.min(np.abs(t[..., None].astype(np.float64) - mids), axis=-1) <= 100 * ulp
    assert near.mean() > 0.5
    assert np.array_equal(ev(mk.quantize(mx.array(x), kind)), tk.quantize(x, kind))


@pytest.mark.parametrize("kind", tk.KINDS)
@SETTINGS
@given(data=st.data())
def test_dequantize_any_valid_block(kind, data):
    """Arbitrary headers (zero, subnormal, negative, inf and NaN scales included) and indices."""
    d = data.draw(st.sampled_from(DIMS) | st.integers(1, 140))
    n, nc, bb = data.draw(st.integers(1, 8)), -(-d // 128), tk.block_bytes(kind)
    blocks = data.draw(hnp.arrays(np.uint8, (n, nc, bb)))
    blocks[..., [2, 3, 6, 7]] = 0  # reserved
    tail = d - (nc - 1) * 128
    blocks[:, -1, 8 + -(-tail * tk.bits(kind) // 8):] = 0  # past element d
    ref = tk.dequantize(blocks, kind, d)
    assert same_floats(ev(mk.dequantize(mx.array(blocks), kind, d)), ref)


def test_huge_zero_and_empty():
    x = np.zeros((3, 64), np.float32)
    x[1] = 1e30  # x*x overflows: norm inf, the indices of a zero vector
    x[2, 5] = -1e-40  # a subnormal alone: x*x underflows to 0
    for kind in tk.KINDS:
        blocks = ev(mk.quantize(mx.array(x), kind))
        assert np.array_equal(blocks, tk.quantize(x, kind))
        assert blocks[1, 0, :2].view("<u2")[0] == 0x7C00
        empty = mk.quantize(mx.zeros((0, 200)), kind)
        assert empty.shape == (0, 2, tk.block_bytes(kind)) and empty.dtype == mx.uint8
        assert mk.dequantize(empty, kind, 200).shape == (0, 200)
        assert mk.scores(mx.zeros((2, 3, 200)), empty, kind, 200).shape == (2, 3, 0)


def test_float16_and_bfloat16_keys_convert_exactly():
    x = np.random.default_rng(5).standard_normal((4, 96)).astype(np.float16)
    for dtype in (mx.float16, mx.bfloat16):
        xm = mx.array(x).astype(dtype)
        exact = ev(xm.astype(mx.float32))
        assert np.array_equal(ev(mk.quantize(xm, "turbo_kv_4b")), tk.quantize(exact, "turbo_kv_4b"))


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", tk.PATHS)
@pytest.mark.parametrize("kind", tk.KINDS)
@SETTINGS
@given(data=st.data())
def test_scores_within_float32_rounding(path, kind, data):
    d = data.draw(st.sampled_from(DIMS) | st.integers(1, 140))
    seed = data.draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    n_keys, m = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 5))
    x = structured_keys(data.draw(st.sampled_from(["normal", "outliers", "tiny", "zeros"])),
                        n_keys, d, seed)
    q = (rng.standard_normal((m, d)) * np.exp(rng.uniform(-3, 3))).astype(np.float32)
    blocks = tk.quantize(x, kind)
    got = ev(mk.scores(mx.array(q), mx.array(blocks), kind, d, path))
    assert_scores_close(got, q, blocks, kind, d, path)


@pytest.mark.parametrize("path", ["int8_codebook", "fp32_codebook"])
@pytest.mark.parametrize("kind", tk.KINDS)
@SETTINGS
@given(data=st.data())
def test_compiled_scores_are_the_uncompiled_bits_for_any_bytes(kind, path, data):
    """The compiled codebook scores (what the KV cache runs: fused element-wise kernels, the int8
    table read from packed constants) are the bits of the uncompiled graph and within float32
    rounding of the oracle, for blocks of any bytes: every index of every chunk, fp16 header
    fields of every class (the zero / subnormal / NaN ones read as quant.cpp reads them)."""
    d = data.draw(st.sampled_from([64, 128, 200]))
    n_keys = data.draw(st.integers(1, 24))
    seed = data.draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (2, n_keys, -(-d // tk.BLOCK), tk.block_bytes(kind)),
                          dtype=np.uint8)
    blocks[..., [2, 3, 6, 7]] = 0  # reserved
    tail = d - (blocks.shape[-2] - 1) * tk.BLOCK  # the last chunk's elements: bytes past them 0
    blocks[..., -1, tk.HEADER_BYTES + -(-tail * tk.bits(kind) // 8):] = 0
    finite = data.draw(st.booleans())
    if finite:  # headers in a range where the scores are finite: the oracle comparison
        norm = rng.uniform(0, 4, blocks.shape[:-1]).astype(np.float16)
        scale = rng.uniform(0.5, 8, blocks.shape[:-1]).astype(np.float16)
        blocks[..., 0:2] = norm[..., None].view(np.uint8)
        blocks[..., 4:6] = scale[..., None].view(np.uint8)
    q = rng.standard_normal((2, 3, d)).astype(np.float32)
    qm, bm = mx.array(q), mx.array(blocks)
    got = ev(mk._codebook_scores(kind, d, path, compiled=True)(qm, bm))
    assert same_floats(got, ev(mk._codebook_scores(kind, d, path)(qm, bm)))
    # the CPU's form (the header's factor in a kernel of its own): the same bits
    assert same_floats(got, ev(mk._codebook_scores(kind, d, path, compiled=True, cpu=True)(qm, bm)))
    if finite:
        assert_scores_close(got, q, blocks, kind, d, path)


@pytest.mark.parametrize("path", tk.PATHS)
def test_scores_broadcast_batch_axes(path):
    """The cache's layout: q [n_kv_heads, group, M, d] against blocks [n_kv_heads, 1, N, ...]."""
    rng = np.random.default_rng(7)
    h, g, m, n, d, kind = 3, 2, 4, 33, 200, "turbo_kv_4b"
    blocks = tk.quantize(rng.standard_normal((h, 1, n, d)).astype(np.float32), kind)
    q = rng.standard_normal((h, g, m, d)).astype(np.float32)
    got = ev(mk.scores(mx.array(q), mx.array(blocks), kind, d, path))
    assert got.shape == (h, g, m, n)
    assert_scores_close(got, q, np.broadcast_to(blocks, (h, g, *blocks.shape[2:])), kind, d, path)


# ---------------------------------------------------------------------------------------------
# Value formats
# ---------------------------------------------------------------------------------------------

@st.composite
def values(draw):
    d = draw(st.sampled_from((1, 31, 32, 33, 64, 96, 128, 200)))
    n = draw(st.integers(1, 8))
    kind = draw(st.sampled_from(["normal", "halves", "raw"]))
    if kind == "raw":
        return draw(hnp.arrays(np.float32, (n, d), elements=st.floats(
            width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    x = rng.standard_normal((n, d)) * np.exp(rng.uniform(-8, 8, (n, 1)))
    if kind == "halves":  # absmax 7 in every group: dq = 1, and x * (1/dq) hits k + 1/2
        x = rng.integers(-7, 7, (n, d)) + 0.5
        x[:, ::32] = 7.0
    return x.astype(np.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # fp16 of huge values: inf
@pytest.mark.parametrize("v_type", tk.V_TYPES)
@SETTINGS
@given(x=values())
def test_value_formats_are_the_oracles(v_type, x):
    d = x.shape[-1]
    ref = tk.quantize_v(x, v_type)
    data = ev(mk.quantize_v(mx.array(x), v_type))
    assert data.shape == ref.shape and np.array_equal(data, ref)
    assert same_floats(ev(mk.dequantize_v(mx.array(ref), v_type, d)),
                       tk.dequantize_v(ref, v_type, d))


def test_q4_rounds_half_away_from_zero():
    x = np.array([[7.0, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 3.4999998] + [0.0] * 24], np.float32)
    data = ev(mk.quantize_v(mx.array(x), "q4"))
    codes = tk.unpack_indices(data[:, 4:], 4, 32)[0, :8].astype(int) - 8
    assert codes.tolist() == [7, 3, -3, 1, -1, 2, -2, 3]


# ---------------------------------------------------------------------------------------------
# The small functions
# ---------------------------------------------------------------------------------------------

def test_f16_decode_every_pattern():
    h = np.arange(65536, dtype=np.uint16)
    assert same_floats(ev(mk.f16_decode(mx.array(h))), tk.f16_decode(h))


@SETTINGS
@given(bits32=hnp.arrays(np.uint32, 256))
def test_f16_trunc_any_float(bits32):
    extra = np.array([0x477FE000, 0x477FF000, 0x38800000, 0x387FFFFF, 0x7F800000, 0xFF800000,
                      0x7FC00001, 0x80000000, 0x00000001], np.uint32)  # max, ties, edges
    x = np.concatenate([bits32, extra]).view(np.float32)
    assert np.array_equal(ev(mk.f16_trunc(mx.array(x))), tk.f16_trunc(x))


@SETTINGS
@given(d=st.integers(1, 300), extra=st.integers(0, 40), seed=st.integers(0, 2 ** 32 - 1))
def test_rotations_are_the_oracles(d, extra, seed):
    x = np.random.default_rng(seed).standard_normal((3, d + extra)).astype(np.float32)
    assert same_floats(ev(mk.rotate(mx.array(x), d)), tk.rotate(x, d))
    assert same_floats(ev(mk.inverse_rotate(mx.array(x), d)), tk.inverse_rotate(x, d))
    assert same_floats(ev(mk.rotate(mx.array(x))), tk.rotate(x))



@SETTINGS
@given(cd=st.integers(1, 128), seed=st.integers(0, 2 ** 32 - 1))
def test_scores_rotate_the_query_as_the_oracle_bit_for_bit(cd, seed):
    """The codebook scores' two-primitive rotation (mx.hadamard_transform) is the butterfly's:
    assert_scores_close's bound takes the rotated query as exact."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((4, cd)) * np.exp(rng.uniform(-20, 20, (4, 1)))).astype(np.float32)
    assert same_floats(ev(mk._rotate_fast(mx.array(x))), tk.rotate(x, cd))


# Kernels of the compiled codebook scores of a 64-element head, as MLX 0.32.4 fuses them: sign
# flip, Hadamard transform, the matmul, and the keys' fused element-wise kernels (1 at 4 bits;
# 2 at 3 and 5 bits with the int8 table, where the indices are assembled from bytes; 3b's float
# codebook 1, 5b's 3).
SCORE_KERNELS = {("turbo_kv_3b", "int8_codebook"): 5, ("turbo_kv_3b", "fp32_codebook"): 4,
                 ("turbo_kv_4b", "int8_codebook"): 4, ("turbo_kv_4b", "fp32_codebook"): 4,
                 ("turbo_kv_5b", "int8_codebook"): 5, ("turbo_kv_5b", "fp32_codebook"): 6}


@pytest.mark.parametrize("path", ["int8_codebook", "fp32_codebook"])
@pytest.mark.parametrize("kind", tk.KINDS)
def test_codebook_scores_are_a_few_kernels(kind, path):
    """A GPU pays per kernel launched: the compiled scores are at most SCORE_KERNELS primitives
    that launch one (the gather-based form they replaced had 34; 5b's int8 path had 6 before its
    table was packed in two constants). Counted on the graph, not evaluated."""
    import io
    import re

    views = {"Reshape", "Broadcast", "Slice", "Transpose", "View", "ExpandDims", "Squeeze"}
    blocks = mx.array(tk.quantize(np.ones((2, 300, 64), np.float32), kind))
    q = mx.zeros((2, 3, 64))
    mx.eval(blocks, q)
    out = mk._codebook_scores(kind, 64, path, compiled=True)(q, blocks)
    buf = io.StringIO()
    mx.export_to_dot(buf, out)
    kernels = [p for p in re.findall(r'label ="(\w+)"', buf.getvalue()) if p not in views]
    assert len(kernels) <= SCORE_KERNELS[kind, path], kernels
    assert "Gather" not in kernels


@SETTINGS
@given(nbits=st.integers(1, 8), n=st.integers(0, 130), data=st.data())
def test_pack_unpack_are_the_oracles(nbits, n, data):
    idx = data.draw(hnp.arrays(np.uint8, (2, n), elements=st.integers(0, (1 << nbits) - 1)))
    packed = tk.pack_indices(idx, nbits)
    assert np.array_equal(ev(mk.pack_indices(mx.array(idx), nbits)), packed)
    assert np.array_equal(ev(mk.unpack_indices(mx.array(packed), nbits, n)), idx)


@pytest.mark.parametrize("levels", [tk.CENTROIDS[k] for k in tk.KINDS] + [tk.Q2_LEVELS],
                         ids=list(tk.KINDS) + ["q2"])
def test_nearest_centroid_dense(levels):
    """Every float32 within 3000 ulps of each level and each midpoint (both signs of zero
    included), plus huge values, infinities and NaN: the scan's index."""
    mids = ((levels[:-1].astype(np.float64) + levels[1:]) / 2).astype(np.float32)
    centers = np.concatenate([levels, mids, np.float32([0.0, -0.0])])
    t = nudge(centers[:, None], np.arange(-3000, 3001)).ravel()
    assert not np.isnan(t).any()
    t = np.concatenate([t, np.float32([1e30, -1e30, 7e4, -7e4, 65536.0, np.inf, -np.inf,
                                       np.nan, 3.4e38])])
    assert np.array_equal(ev(mk.nearest_centroid(mx.array(t), levels)),
                          tk.nearest_centroid(t, levels))


# ---------------------------------------------------------------------------------------------
# Laziness: building the graph of a decode step evaluates and transfers nothing
# ---------------------------------------------------------------------------------------------

def _decode_step(x, q, v):
    """quantize + every score path + dequantize + the value formats, as the cache calls them."""
    out = []
    for kind in tk.KINDS:
        blocks = mk.quantize(x, kind)
        out.append(mk.dequantize(blocks, kind, x.shape[-1]))
        out += [mk.scores(q, blocks, kind, x.shape[-1], p) for p in tk.PATHS]
    for v_type in tk.V_TYPES:
        out.append(mk.dequantize_v(mk.quantize_v(v, v_type), v_type, v.shape[-1]))
    out += [mk.f16_decode(mk.f16_trunc(x)), mk.inverse_rotate(mk.rotate(x)),
            mk.unpack_indices(mk.pack_indices(mx.zeros((3, 5), mx.uint8), 5), 5, 5),
            mk.nearest_centroid(x, tk.Q2_LEVELS)]
    return out


def _step_inputs():
    rng = np.random.default_rng(11)
    x = mx.array(rng.standard_normal((3, 8, 200)).astype(np.float32))  # [n_kv_heads, T, d]
    q = mx.array(rng.standard_normal((3, 4, 200)).astype(np.float32))
    v = mx.array(rng.standard_normal((3, 8, 200)).astype(np.float32))
    return x, q, v


def test_building_the_graph_syncs_nothing(monkeypatch):
    calls = []

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper

    inputs = _step_inputs()
    mx.eval(*inputs)
    for name in ("eval", "async_eval"):
        monkeypatch.setattr(mx, name, counting(name, getattr(mx, name)))
    for name in ("item", "tolist", "__array__", "__dlpack__", "__bool__", "__float__",
                 "__int__", "__index__"):
        if hasattr(mx.array, name):
            monkeypatch.setattr(mx.array, name, counting(name, getattr(mx.array, name)))
    out = _decode_step(*inputs)
    assert calls == []
    monkeypatch.undo()
    mx.eval(*out)  # and it is a graph that runs
    blocks = tk.quantize(np.array(inputs[0]), "turbo_kv_5b")
    assert same_floats(np.array(out[8]), tk.dequantize(blocks, "turbo_kv_5b", 200))


def test_graph_traces_under_compile():
    """``mx.compile`` refuses any evaluation while it traces: the whole step traces."""
    step = mx.compile(lambda x, q, v: _decode_step(x, q, v))
    out = step(*_step_inputs())
    mx.eval(*out)  # (compiled results are not compared: fusion may contract multiply-adds)


# ---------------------------------------------------------------------------------------------
# Errors: typed, naming the problem; data checks only with check=True
# ---------------------------------------------------------------------------------------------

def test_argument_errors():
    x = mx.zeros((2, 64))
    blocks = mk.quantize(x, "turbo_kv_4b")
    with pytest.raises(TypeError, match="mx.array"):
        mk.quantize(np.zeros((2, 64), np.float32), "turbo_kv_4b")
    with pytest.raises(TypeError, match="float64"), mx.stream(mx.cpu):  # no float64 on GPUs
        mk.quantize(mx.zeros((2, 64), mx.float64), "turbo_kv_4b")
    with pytest.raises(TypeError, match="float32"):
        mk.quantize(mx.zeros((2, 64), mx.int32), "turbo_kv_4b")
    with pytest.raises(ValueError, match="unknown turbo_kv kind"):
        mk.quantize(x, "turbo_kv_2b")
    with pytest.raises(ValueError, match="d >= 1"):
        mk.quantize(mx.zeros((2, 0)), "turbo_kv_4b")
    with pytest.raises(ValueError, match="inconsistent"):
        mk.dequantize(blocks, "turbo_kv_4b", 200)
    with pytest.raises(ValueError, match="have 56 bytes; got last axis 72"):
        mk.dequantize(blocks, "turbo_kv_3b", 64)
    with pytest.raises(TypeError, match="uint8"):
        mk.dequantize(blocks.astype(mx.int8), "turbo_kv_4b", 64)
    with pytest.raises(ValueError, match="unknown scores path"):
        mk.scores(x, blocks, "turbo_kv_4b", 64, path="int4")
    with pytest.raises(ValueError, match="q must be"):
        mk.scores(mx.zeros((2, 32)), blocks, "turbo_kv_4b", 64)
    with pytest.raises(ValueError, match="N, n_chunks"):
        mk.scores(x, blocks[0], "turbo_kv_4b", 64)
    with pytest.raises(ValueError, match="do not broadcast"):
        mk.scores(mx.zeros((3, 2, 64)), mx.stack([blocks] * 2), "turbo_kv_4b", 64)
    with pytest.raises(ValueError, match="unknown value type"):
        mk.quantize_v(x, "q3")
    with pytest.raises(ValueError, match="take 40 bytes"):
        mk.dequantize_v(mx.zeros((2, 41), mx.uint8), "q4", 64)
    with pytest.raises(TypeError, match="d must be an int"):
        mk.dequantize(blocks, "turbo_kv_4b", 64.0)
    with pytest.raises(ValueError, match="bits"):
        mk.pack_indices(mx.zeros((4,), mx.uint8), 9)
    with pytest.raises(TypeError, match="integer"):
        mk.pack_indices(mx.zeros((4,)), 3)
    with pytest.raises(ValueError, match="need 2 bytes"):
        mk.unpack_indices(mx.zeros((1,), mx.uint8), 3, 5)
    with pytest.raises(TypeError, match="NumPy"):
        mk.nearest_centroid(mx.zeros((4,)), mx.array(tk.Q2_LEVELS))
    with pytest.raises(ValueError, match="strictly increasing"):
        mk.nearest_centroid(mx.zeros((4,)), [1.0, 0.0])
    with pytest.raises(TypeError, match="float32"):
        mk.f16_trunc(mx.zeros((4,), mx.float16))
    with pytest.raises(TypeError, match="uint16"):
        mk.f16_decode(mx.zeros((4,), mx.int32))
    with pytest.raises(ValueError, match="longer than"):
        mk.rotate(mx.zeros((2, 8)), 16)


def test_data_checks_only_on_request():
    x = np.ones((2, 64), np.float32)
    x[1, 17] = np.nan
    lazy = mk.quantize(mx.array(x), "turbo_kv_4b")  # the lazy path cannot look
    assert lazy.shape == (2, 1, 72)
    with pytest.raises(ValueError, match=r"x\[1, 17\] is nan"):
        mk.quantize(mx.array(x), "turbo_kv_4b", check=True)
    with pytest.raises(ValueError, match=r"x\[1, 17\] is nan"):
        mk.quantize_v(mx.array(x), "q4", check=True)
    blocks = tk.quantize(np.ones((2, 64), np.float32), "turbo_kv_4b")
    blocks[1, 0, 3] = 1
    with pytest.raises(ValueError, match="reserved"):
        mk.dequantize(mx.array(blocks), "turbo_kv_4b", 64, check=True)
    long = tk.quantize(np.ones((2, 100), np.float32), "turbo_kv_3b")
    with pytest.raises(ValueError, match="past element 60"):
        mk.scores(mx.zeros((1, 60)), mx.array(long), "turbo_kv_3b", 60, check=True)
    with pytest.raises(ValueError, match=r"q\[0, 2\] is inf"):
        q = np.zeros((1, 64), np.float32)
        q[0, 2] = np.inf
        mk.scores(mx.array(q), mx.array(blocks[:1]), "turbo_kv_4b", 64, check=True)


@pytest.mark.parametrize("sms", [None, 132])
def test_turbo_prefill_takes_only_shapes_whose_block_fits(monkeypatch, sms):
    """turbo_prefill.why_not: a block of one row must fit its shared memory (48 KiB), else the
    plain graph runs the chunk's attention (a kernel that cannot compile is never asked for);
    the block the rule picks fits for every head size it takes; on 132 SMs a chunk of 512
    (SmolLM2's heads) takes 12 rows and 18 warps, 129 blocks: one an SM."""
    from quantref_mlx import turbo_prefill as tp
    from quantref_mlx.fused_decode import TurboSpec

    monkeypatch.setattr(tp, "_sm_count", lambda: sms)  # no GPU here, or the H200's count
    spec = TurboSpec("turbo_kv_4b", "int8_codebook", "fp16", 16)  # a k-window: queries twice
    assert tp.why_not(spec, 9, 3, 64) is None
    assert "shared memory" in tp.why_not(spec, 64, 1, 64)  # 64 query heads a KV head
    for nh, nkv, hd in ((9, 3, 64), (4, 2, 128), (4, 1, 256), (8, 1, 32)):
        assert tp.why_not(spec, nh, nkv, hd) is None
        for T in (2, 5, 128, 512, 1024):
            rows, nw = tp._shape(T, nkv, nh // nkv, hd, spec)
            assert rows >= 1 and 1 <= nw <= tp.MAX_WARPS[hd <= 64]
            assert tp._smem(rows, nh // nkv, hd, dict(spec.template(hd))["NLEV"], True, nw) \
                <= tp.SMEM
    if sms:
        assert tp._shape(512, 3, 3, 64, spec) == (12, 18)
