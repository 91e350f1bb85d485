"""quantref.quants against its two references, bit for bit.

- gguf.quants (gguf-py 0.19.0, pinned): dequantize on random blocks (arbitrary bytes, with
  float16 scales forced to NaN / Inf / subnormal / signed zero) and on every tensor of the
  two real models; quantize (F32, F16, BF16, Q8_0, Q4_0) on random float32 rows with zeros,
  rounding ties and extreme magnitudes.
- mlx.core 0.32.4 on the CPU: quantize_affine / dequantize_affine vs mx.quantize /
  mx.dequantize, float32 and float16.

"Bitwise" compares integer views of the float arrays, so NaN payloads and signed zeros count.
"""

from __future__ import annotations

import collections

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from hypothesis import given, settings
from hypothesis import strategies as st

from quantref import quants

BLOCK_TYPES = [t for t in quants.BLOCKS if quants.BLOCKS[t][0] > 1]
FLOAT_TYPES = [QT.F32, QT.F16, QT.BF16]
QUANTIZE_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0]

# float16 bit patterns that break naive decoders: quiet / signalling NaN with payloads and
# both signs, infinities, signed zeros, smallest and largest subnormal, extreme normals.
SPECIAL_F16 = [0x7E00, 0x7C01, 0x7DFF, 0xFE00, 0xFC01, 0xFFFF, 0x7C00, 0xFC00, 0x0000, 0x8000,
               0x0001, 0x03FF, 0x8001, 0x83FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00]
SPECIAL_F32 = [0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0xFFC00001, 0x7F800000, 0xFF800000,
               0x00000000, 0x80000000, 0x00000001, 0x007FFFFF, 0x80000001, 0x00800000,
               0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000, 0x3F808000, 0x3F818000]


def as_bits(a: np.ndarray) -> np.ndarray:
    """The integer view of a float array (same shape), for bitwise comparison."""
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_bitwise_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, (ours.dtype, ours.shape, ref.shape)
    diff = as_bits(ours) != as_bits(ref)
    if diff.any():
        i = tuple(np.argwhere(diff)[0])
        raise AssertionError(
            f"{diff.sum()} of {diff.size} differ; first at {i}: "
            f"ours {as_bits(ours)[i]:#x}, reference {as_bits(ref)[i]:#x}"
        )


def gguf_dequantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    with np.errstate(all="ignore"):  # gguf-py warns on NaN/Inf scales; the values are the point
        return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)


def gguf_quantize_bytes(x: np.ndarray, qtype: QT) -> np.ndarray:
    with np.errstate(all="ignore"):
        q = np.asarray(gguf.quants.quantize(x, qtype))
    return q.view(np.uint8).reshape(*x.shape[:-1], -1)


def layout_of(qtype: QT) -> np.dtype:
    return getattr(quants, f"BLOCK_{qtype.name}")


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


def test_blocks_agree_with_ggml_sizes():
    """Every layout's (block_elems, block_bytes) is ggml's, and the struct has no padding."""
    assert set(quants.BLOCKS) == {*FLOAT_TYPES, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
                                  QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K}
    for t, sizes in quants.BLOCKS.items():
        assert sizes == gguf.constants.GGML_QUANT_SIZES[t], t.name
    for t in BLOCK_TYPES:
        layout = layout_of(t)
        assert layout.itemsize == quants.BLOCKS[t][1], t.name
        assert sum(f[0].itemsize for f in layout.fields.values()) == layout.itemsize, t.name


def test_row_bytes():
    assert quants.row_bytes(QT.Q4_1, 576) == 18 * 20
    assert quants.row_bytes(QT.Q6_K, 512) == 2 * 210
    assert quants.row_bytes(QT.BF16, 7) == 14
    assert quants.row_bytes(QT.Q8_0, 0) == 0
    with pytest.raises(ValueError, match="Q4_K row of 100 weights.*256"):
        quants.row_bytes(QT.Q4_K, 100)
    with pytest.raises(quants.UnsupportedQuantError, match="IQ2_XXS"):
        quants.row_bytes(QT.IQ2_XXS, 256)


# --------------------------------------------------------------------------------------------
# dequantize vs gguf.quants: random blocks
# --------------------------------------------------------------------------------------------


@st.composite
def raw_rows(draw, qtype: QT) -> np.ndarray:
    """uint8 [rows, row_bytes] of arbitrary bytes, with special float16/float32 scale values
    written over (some of) the blocks' scale fields."""
    elems, nbytes = quants.BLOCKS[qtype]
    rows = draw(st.integers(1, 3))
    per_row = draw(st.integers(1, 4) if elems > 1 else st.integers(1, 40))
    n = rows * per_row
    data = np.frombuffer(draw(st.binary(min_size=n * nbytes, max_size=n * nbytes)), np.uint8)
    blocks = data.copy().reshape(n, nbytes)
    if qtype in (QT.F16, QT.BF16):
        fields = [(0, SPECIAL_F16 if qtype == QT.F16 else [b >> 16 for b in SPECIAL_F32], "<u2")]
    elif qtype == QT.F32:
        fields = [(0, SPECIAL_F32, "<u4")]
    else:
        layout = layout_of(qtype)
        fields = [(off, SPECIAL_F16, "<u2") for dt, off in layout.fields.values() if dt == "<f2"]
    for offset, specials, dt in fields:
        width = np.dtype(dt).itemsize
        values = draw(st.lists(st.one_of(st.none(), st.sampled_from(specials)),
                               min_size=n, max_size=n))
        for i, v in enumerate(values):
            if v is not None:
                blocks[i, offset : offset + width] = np.array([v], dt).view(np.uint8)
    return blocks.reshape(rows, per_row * nbytes)


@pytest.mark.parametrize("qtype", list(quants.BLOCKS), ids=lambda t: t.name)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_dequantize_random_blocks_bitwise(qtype, data):
    raw = data.draw(raw_rows(qtype))
    assert_bitwise_equal(quants.dequantize(raw, qtype), gguf_dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", list(quants.BLOCKS), ids=lambda t: t.name)
def test_dequantize_many_random_blocks_bitwise(qtype):
    """Many uniformly random blocks (crossing the internal chunk size) in one 3-D call."""
    elems, nbytes = quants.BLOCKS[qtype]
    n_blocks = 2 * quants._CHUNK_WEIGHTS // elems + 3
    raw = np.random.default_rng(int(qtype)).integers(0, 256, (n_blocks, nbytes), np.uint8)
    raw = raw.reshape(n_blocks, 1, nbytes)
    ours = quants.dequantize(raw, qtype)
    assert ours.shape == (n_blocks, 1, elems)
    assert_bitwise_equal(ours, gguf_dequantize(raw, qtype).reshape(ours.shape))


def test_dequantize_known_values():
    """Hand-built blocks, so that the layouts are pinned independently of gguf-py."""
    q8 = np.zeros(1, quants.BLOCK_Q8_0)
    q8["d"], q8["qs"] = 0.5, np.arange(-16, 16)
    np.testing.assert_array_equal(
        quants.dequantize(q8.view(np.uint8), QT.Q8_0), 0.5 * np.arange(-16, 16))
    q41 = np.zeros(1, quants.BLOCK_Q4_1)
    q41["d"], q41["m"] = 2.0, -1.0
    q41["qs"] = np.arange(16) | (15 - np.arange(16)) << 4  # weights 0..15, then 15..0
    expected = 2.0 * np.r_[np.arange(16), 15 - np.arange(16)] - 1.0
    np.testing.assert_array_equal(quants.dequantize(q41.view(np.uint8), QT.Q4_1), expected)
    q50 = np.zeros(1, quants.BLOCK_Q5_0)
    q50["d"] = 1.0
    q50["qh"] = np.array([1 << 31 | 1], "<u4").view(np.uint8)  # bit 4 of weights 0 and 31
    got = quants.dequantize(q50.view(np.uint8), QT.Q5_0)
    assert got[0] == got[31] == 0.0 and (got[1:31] == -16.0).all()


def test_dequantize_own_float_dtypes():
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    for qtype, own in [(QT.F32, x), (QT.F16, x.astype(np.float16))]:
        ours = quants.dequantize(own, qtype)
        assert_bitwise_equal(ours, own.astype(np.float32))
        assert not np.shares_memory(ours, own)
        assert_bitwise_equal(quants.dequantize(own.view(np.uint8), qtype), ours)
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    assert_bitwise_equal(quants.dequantize(bf16, QT.BF16),
                         (x.view(np.uint32) & 0xFFFF0000).view(np.float32))


def test_dequantize_takes_strided_input_and_leaves_it_alone():
    raw = np.random.default_rng(2).integers(0, 256, (4, 3 * 144), np.uint8)
    before = raw.copy()
    strided = raw[::2, 144:]  # rows 0, 2; blocks 1, 2: not contiguous
    assert_bitwise_equal(quants.dequantize(strided, QT.Q4_K),
                         gguf_dequantize(np.ascontiguousarray(strided), QT.Q4_K))
    np.testing.assert_array_equal(raw, before)


def test_dequantize_empty():
    out = quants.dequantize(np.zeros((0, 40), np.uint8), QT.Q4_1)
    assert out.shape == (0, 64) and out.dtype == np.float32


def test_dequantize_errors():
    with pytest.raises(quants.UnsupportedQuantError, match="IQ4_XS") as e:
        quants.dequantize(np.zeros((1, 136), np.uint8), QT.IQ4_XS)
    assert e.value.qtype == QT.IQ4_XS
    with pytest.raises(quants.UnsupportedQuantError, match="Q8_K"):
        quants.dequantize(np.zeros((1, 292), np.uint8), QT.Q8_K)
    with pytest.raises(quants.UnsupportedQuantError, match="12345"):
        quants.dequantize(np.zeros((1, 34), np.uint8), 12345)
    with pytest.raises(ValueError, match="Q8_0 row of 35 bytes.*34-byte"):
        quants.dequantize(np.zeros((2, 35), np.uint8), QT.Q8_0)
    with pytest.raises(ValueError, match="uint8.*float32"):
        quants.dequantize(np.zeros((1, 34), np.float32), QT.Q8_0)
    with pytest.raises(ValueError, match="uint8.*float16"):
        quants.dequantize(np.zeros((1, 4), np.float16), QT.F32)
    with pytest.raises(ValueError, match="scalar"):
        quants.dequantize(np.uint8(3), QT.F16)
    assert quants.dequantize(np.zeros((1, 34), np.uint8), int(QT.Q8_0)).shape == (1, 32)


# --------------------------------------------------------------------------------------------
# dequantize vs gguf.quants: every tensor of the real models
# --------------------------------------------------------------------------------------------

ROWS_PER_CHUNK = 8192  # compare big tensors (gemma's 262144-row embedding) a slice at a time


def _sweep(path) -> collections.Counter:
    """Compare every tensor of a GGUF file; count the tensors seen per type.

    The bytes come from quantref.gguf (gguf-py's GGUFReader takes ~12 s to parse gemma's
    262144-token vocabulary); both decoders get the same bytes.
    """
    from quantref.gguf import read as read_gguf  # only these two tests need the reader

    seen: collections.Counter = collections.Counter()
    with read_gguf(path) as f:
        for name, info in f.tensors.items():
            raw = f.raw(name)
            raw = raw.reshape(-1, raw.shape[-1])  # rows of bytes
            for start in range(0, len(raw), ROWS_PER_CHUNK):
                part = raw[start : start + ROWS_PER_CHUNK]
                ours = quants.dequantize(part, info.qtype)
                assert_bitwise_equal(ours, gguf_dequantize(part, info.qtype).reshape(ours.shape))
            seen[info.qtype.name] += 1
    return seen


@pytest.mark.model
def test_default_model_every_tensor_bitwise(default_model_path):
    assert _sweep(default_model_path) == {"Q4_1": 210, "Q8_0": 1, "F32": 61}


@pytest.mark.model
def test_gemma_model_every_tensor_bitwise(gemma_model_path):
    seen = _sweep(gemma_model_path)
    assert seen == {"F32": 109, "Q8_0": 10, "Q5_0": 81, "Q4_K": 27, "Q6_K": 9}


# --------------------------------------------------------------------------------------------
# quantize vs gguf.quants
# --------------------------------------------------------------------------------------------

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def float_block(draw) -> list[float]:
    """32 finite float32 values of one of several shapes that stress a block quantizer."""
    kind = draw(st.sampled_from(["any", "grid", "zeros", "scaled", "equal-peaks"]))
    if kind == "any":  # hypothesis' floats: huge, tiny, subnormal, +-0 mixed
        return draw(st.lists(finite32, min_size=32, max_size=32))
    if kind == "zeros":
        return draw(st.lists(st.sampled_from([0.0, -0.0]), min_size=32, max_size=32))
    if kind == "scaled":  # one magnitude per block, from subnormal to near FLT_MAX
        exponent = draw(st.integers(-45, 37))
        unit = st.floats(-1, 1, width=32)
        return [v * 10.0**exponent for v in draw(st.lists(unit, min_size=32, max_size=32))]
    # Half-integer multiples of a power of two with a peak of 127 (Q8_0: d is exactly the
    # power of two) or 8 or 16 (Q4_0): x / d lands exactly on .5 ties.
    scale = 2.0 ** draw(st.integers(-140, 119))
    halves = draw(st.lists(st.integers(-254, 254), min_size=32, max_size=32))
    peak = draw(st.sampled_from([127, -127, 8, -8, 16, -16]))
    if kind == "equal-peaks":  # +peak and -peak both present: argmax must take the first
        halves[draw(st.integers(0, 15))] = -2 * peak
    halves[draw(st.integers(16, 31))] = 2 * peak
    return [h / 2 * scale for h in halves]


@st.composite
def float_rows(draw) -> np.ndarray:
    rows = draw(st.integers(1, 3))
    per_row = draw(st.integers(1, 3))
    blocks = draw(st.lists(float_block(), min_size=rows * per_row, max_size=rows * per_row))
    return np.array(blocks, np.float64).astype(np.float32).reshape(rows, per_row * 32)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0], ids=lambda t: t.name)
@settings(max_examples=150, deadline=None)
@given(x=float_rows())
def test_quantize_blocks_bitwise(qtype, x):
    assert_bitwise_equal(quants.quantize(x, qtype), gguf_quantize_bytes(x, qtype))


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
@settings(max_examples=60, deadline=None)
@given(bits=st.lists(st.one_of(st.integers(0, 2**32 - 1), st.sampled_from(SPECIAL_F32)),
                     min_size=1, max_size=40))
def test_quantize_float_types_bitwise(qtype, bits):
    """Any float32 bit pattern, NaN payloads and Inf included: these are conversions, and
    gguf-py defines them for non-finite values (BF16 quiets NaN, F16 keeps it)."""
    x = np.array(bits, np.uint32).view(np.float32).reshape(1, -1)
    assert_bitwise_equal(quants.quantize(x, qtype), gguf_quantize_bytes(x, qtype))


def test_quantize_real_weights_bitwise():
    """Big inputs (several chunks of blocks), normal-looking values, 3-D shape."""
    x = np.random.default_rng(3).standard_normal((4, 128, 576)).astype(np.float32)
    x[0, 0, :64] = 0.0
    for qtype in QUANTIZE_TYPES:
        ours = quants.quantize(x, qtype)
        assert ours.shape == (4, 128, quants.row_bytes(qtype, 576)) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, gguf_quantize_bytes(x, qtype), err_msg=qtype.name)


def test_quantize_tiny_blocks_write_zero_codes():
    """Below ~3.7e-37 ggml's 1/d overflows and its int8 casts of inf/NaN give 0 on x86; we
    write those zeros on purpose (d is float16 zero there, so every weight decodes to 0)."""
    x = np.full((1, 32), 1e-38, np.float32)
    x[0, 3] = -2e-40
    for qtype in (QT.Q8_0, QT.Q4_0):
        q = quants.quantize(x, qtype)
        np.testing.assert_array_equal(q, gguf_quantize_bytes(x, qtype))
        assert not quants.dequantize(q, qtype).any()


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0], ids=lambda t: t.name)
@settings(max_examples=60, deadline=None)
@given(
    unit=st.lists(st.floats(-1, 1, width=32), min_size=64, max_size=64)
    .filter(lambda u: max(map(abs, u[:32])) > 0 and max(map(abs, u[32:])) > 0),
    magnitude=st.floats(0.01, 1e5),
)
def test_quantize_roundtrip_error_bound(qtype, unit, magnitude):
    """|x - dequantize(quantize(x))| <= bound * |d| per block, where d = amax / 127 (Q8_0)
    or amax / 8 (Q4_0); each block's amax is ``magnitude``, which keeps d a normal float16.

    Bound: rounding to the nearest code costs d / 2 for Q8_0, but Q4_0's truncation clips
    the code +8 (a weight opposite the extreme one) to +7, up to a whole d; storing d in
    float16 (relative error 2^-11) moves a code q by |q| * d * 2^-11 with |q| <= 127 or 8;
    1e-4 covers x * (1/d) being float32-rounded before rounding to a code.
    """
    u = np.array(unit, np.float64).reshape(2, 32)
    x = (u / np.abs(u).max(axis=1, keepdims=True) * magnitude).astype(np.float32)
    y = quants.dequantize(quants.quantize(x, qtype), qtype)
    amax = np.abs(x).max(axis=1, keepdims=True)
    if qtype == QT.Q8_0:
        bound = amax / 127 * (0.5 + 127 * 2.0**-11 + 1e-4)
    else:
        bound = amax / 8 * (1 + 8 * 2.0**-11 + 1e-4)
    assert (np.abs(x - y) <= bound).all()


def test_quantize_rejects_non_finite():
    x = np.zeros((2, 3, 64), np.float32)
    x[1, 2, 37] = np.nan
    x[1, 2, 40] = np.inf
    for qtype in (QT.Q8_0, QT.Q4_0):
        with pytest.raises(ValueError, match=rf"{qtype.name}.*non-finite.*\(1, 2, 37\)"):
            quants.quantize(x, qtype)


def test_quantize_empty():
    """No rows, or rows of no weights (an empty KV cache), give empty byte arrays."""
    for qtype in QUANTIZE_TYPES:
        assert quants.quantize(np.zeros((0, 64), np.float32), qtype).shape == (
            0, quants.row_bytes(qtype, 64))
        assert quants.quantize(np.zeros((2, 0), np.float32), qtype).shape == (2, 0)


def test_quantize_errors():
    with pytest.raises(quants.UnsupportedQuantError, match="Q4_K"):
        quants.quantize(np.zeros((1, 256), np.float32), QT.Q4_K)
    with pytest.raises(ValueError, match="Q8_0 row of 48 weights.*32-weight"):
        quants.quantize(np.zeros((1, 48), np.float32), QT.Q8_0)
    with pytest.raises(ValueError, match="complex"):
        quants.quantize(np.zeros((1, 32), np.complex64), QT.Q8_0)
    with pytest.raises(ValueError, match="scalar"):
        quants.quantize(np.float32(1), QT.F32)


# --------------------------------------------------------------------------------------------
# MLX affine quantization
# --------------------------------------------------------------------------------------------


@st.composite
def affine_input(draw, dtype) -> np.ndarray:
    group = draw(st.sampled_from([32, 64, 128]))
    rows = draw(st.integers(1, 3))
    n = rows * group * draw(st.integers(1, 2))
    if dtype == np.float16:
        finite16 = st.integers(0, 0xFFFF).filter(lambda b: b & 0x7C00 != 0x7C00)
        bits = draw(st.lists(st.one_of(finite16, st.sampled_from(
            [b for b in SPECIAL_F16 if b & 0x7C00 != 0x7C00])), min_size=n, max_size=n))
        values = np.array(bits, np.uint16).view(np.float16)
        if draw(st.booleans()):  # smooth data: the bits above are mostly wild magnitudes
            values = (np.array(draw(st.lists(st.floats(-1, 1), min_size=n, max_size=n)))
                      * 10.0 ** draw(st.integers(-7, 4))).astype(np.float16)
    else:
        blocks = draw(st.lists(float_block(), min_size=n // 32, max_size=n // 32))
        values = np.array(blocks, np.float64).astype(np.float32)
    return values.reshape(rows, -1), group


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_quantize_affine_matches_mlx(dtype, bits, data):
    mx = pytest.importorskip("mlx.core")
    x, group = data.draw(affine_input(dtype))
    ref = mx.quantize(mx.array(x), group_size=group, bits=bits)
    ours = quants.quantize_affine(x, bits=bits, group_size=group)
    for o, r in zip(ours, ref):
        assert_bitwise_equal(o, np.array(r))
    # and the decode of those codes
    deq = mx.dequantize(*ref, group_size=group, bits=bits)
    assert_bitwise_equal(quants.dequantize_affine(*ours, bits=bits, group_size=group),
                         np.array(deq))


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_dequantize_affine_arbitrary_bits_match_mlx(dtype, bits, data):
    """Any packed words and any scale / bias bit patterns (NaN, Inf, subnormal)."""
    mx = pytest.importorskip("mlx.core")
    group = data.draw(st.sampled_from([32, 64, 128]))
    words = group * bits // 32 * data.draw(st.integers(1, 2))
    packed = np.array(data.draw(st.lists(st.integers(0, 2**32 - 1),
                                         min_size=2 * words, max_size=2 * words)), np.uint32)
    packed = packed.reshape(2, words)
    n_groups = 2 * (words * 32 // bits // group)
    if dtype == np.float16:
        special, top, view = SPECIAL_F16, 2**16 - 1, np.uint16
    else:
        special, top, view = SPECIAL_F32, 2**32 - 1, np.uint32
    fields = [np.array(data.draw(st.lists(st.one_of(st.integers(0, top), st.sampled_from(special)),
                                          min_size=n_groups, max_size=n_groups)), view)
              .view(dtype).reshape(2, -1) for _ in range(2)]
    ref = mx.dequantize(mx.array(packed), mx.array(fields[0]), mx.array(fields[1]),
                        group_size=group, bits=bits)
    ours = quants.dequantize_affine(packed, *fields, bits=bits, group_size=group)
    assert_bitwise_equal(ours, np.array(ref))


def test_affine_kv_cache_shape_and_error():
    """mlx-lm quantizes keys [B, n_kv_heads, T, head_dim] along head_dim; check the shapes
    and the error bound of MLX's algorithm: one step |scale|, not half. The scale is refit
    to edge / rint(edge / scale) so that the edge of larger magnitude is exact; that can
    shrink the step by up to a factor n_bins / (n_bins + 1), leaving the opposite end of the
    group up to one step outside the grid, where it is clipped."""
    x = np.random.default_rng(4).standard_normal((1, 3, 5, 64)).astype(np.float32)
    packed, scales, biases = quants.quantize_affine(x, bits=4, group_size=64)
    assert packed.shape == (1, 3, 5, 8) and packed.dtype == np.uint32
    assert scales.shape == biases.shape == (1, 3, 5, 1) and scales.dtype == np.float32
    y = quants.dequantize_affine(packed, scales, biases, bits=4, group_size=64)
    # one step, plus 1e-5 of a step for the float32 rounding of (x - bias) / scale and
    # scale * q + bias (a few ulps of values ~ 16 steps)
    err = np.abs(x - y) / np.abs(scales)
    assert err.max() <= 1 + 1e-5
    assert np.median(err) <= 0.5  # and most weights are within half a step


def test_affine_empty():
    packed, scales, biases = quants.quantize_affine(np.zeros((3, 0, 64), np.float16))
    assert packed.shape == (3, 0, 8) and scales.shape == biases.shape == (3, 0, 1)
    assert quants.dequantize_affine(packed, scales, biases).shape == (3, 0, 64)


def test_affine_errors():
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match="bits.*got 3"):
        quants.quantize_affine(x, bits=3)
    with pytest.raises(ValueError, match="group_size.*got 16"):
        quants.quantize_affine(x, group_size=16)
    with pytest.raises(ValueError, match="float32 or float16.*float64"):
        quants.quantize_affine(x.astype(np.float64))
    with pytest.raises(ValueError, match=r"last dimension \(64,\).*128"):
        quants.quantize_affine(x, group_size=128)
    x[1, 5] = -np.inf
    with pytest.raises(ValueError, match=r"non-finite.*\(1, 5\)"):
        quants.quantize_affine(x)
    packed, scales, biases = quants.quantize_affine(np.zeros((2, 128), np.float32))
    with pytest.raises(ValueError, match=r"needs scales and biases \(2, 2\)"):
        quants.dequantize_affine(packed, scales[:, :1], biases)
    with pytest.raises(ValueError, match="uint32"):
        quants.dequantize_affine(packed.astype(np.int64), scales, biases)
    with pytest.raises(ValueError, match="float32 or float16"):
        quants.dequantize_affine(packed, scales, biases.astype(np.float16))
