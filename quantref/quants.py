"""ggml's block quantization formats, and MLX's affine group quantization, in NumPy.

A quantized GGUF tensor row is a run of fixed-size *blocks*; each block holds ``block_elems``
weights in ``block_bytes`` bytes: one or two float16 scales and packed integer codes. Each
layout below is written once, as a NumPy structured dtype beside the function that decodes
it, so the byte layout can be read off the code (compare ggml's ``ggml-common.h``).

The API mirrors ``gguf.quants`` so that the two can be compared call for call, and the
results are bitwise equal to it (NaN payloads and signed zeros included): every dequantizer
performs the same float32 operations in the same order. What differs is speed: rows are
decoded in cache-sized chunks of blocks, in place, without per-row Python work.

- ``dequantize(data, qtype)``: uint8 ``[..., row_bytes]`` -> float32 ``[..., row_elems]``.
- ``quantize(x, qtype)``: float32 ``[..., row_elems]`` -> uint8 ``[..., row_bytes]`` for F32,
  F16, BF16, Q8_0 and Q4_0 (Q8_0 and Q4_0 are also llama.cpp's KV-cache types).
- ``quantize_affine`` / ``dequantize_affine``: ``mx.quantize`` / ``mx.dequantize`` (mlx-lm's
  QuantizedKVCache), bit-exact with MLX 0.32.4 on the CPU for float32 and float16 input.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType

__all__ = [
    "BLOCKS",
    "UnsupportedQuantError",
    "dequantize",
    "dequantize_affine",
    "quantize",
    "quantize_affine",
    "row_bytes",
]

QT = GGMLQuantizationType

QK = 32  # weights per block of the legacy types (Q4_0 ... Q8_0)
QK_K = 256  # weights per super-block of the K-quants

# Rows are decoded this many weights at a time, so that a chunk's codes, scales and output
# (~0.5 MiB float32) stay in the L2 cache between the few passes over them.
_CHUNK_WEIGHTS = 1 << 17


class UnsupportedQuantError(ValueError):
    """A ggml type this module cannot (de)quantize; ``qtype`` names it."""

    def __init__(self, qtype: object, operation: str) -> None:
        self.qtype = qtype
        name = getattr(qtype, "name", repr(qtype))
        super().__init__(f"{operation} of ggml type {name} is not supported")


# --------------------------------------------------------------------------------------------
# Shared unpacking helpers
# --------------------------------------------------------------------------------------------


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 ``[..., k]`` -> uint8 ``[..., 2, k]``: all low nibbles, then all high nibbles.

    This is ggml's order: byte ``j`` of a run holds weight ``j`` (low) and ``j + k`` (high).
    """
    out = np.empty((*qs.shape[:-1], 2, qs.shape[-1]), np.uint8)
    np.bitwise_and(qs, 0x0F, out=out[..., 0, :])
    np.right_shift(qs, 4, out=out[..., 1, :])
    return out


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """uint8 ``[..., k]`` -> uint8 ``[..., 4, k]``: bit pairs 0-1, 2-3, 4-5, 6-7 of each byte."""
    shifts = np.array([0, 2, 4, 6], np.uint8)[:, None]
    return (qs[..., None, :] >> shifts) & np.uint8(3)


_BIT_SHIFTS = np.arange(8, dtype=np.uint8)[:, None]


def _bit_planes(qh: np.ndarray) -> np.ndarray:
    """uint8 ``[n, k]`` -> uint8 ``[n, 8, k]``: plane ``s`` holds bit ``s`` of every byte."""
    return (qh[:, None, :] >> _BIT_SHIFTS) & np.uint8(1)


def _f32(field: np.ndarray) -> np.ndarray:
    """A float16 scale field ``[n]`` -> float32 ``[n, 1]``, ready to broadcast over a block."""
    return field.astype(np.float32)[:, None]


# --------------------------------------------------------------------------------------------
# Block layouts and their dequantizers.
#
# Each dequantizer takes blocks (a 1-D array of its layout, length n) and writes the weights
# into ``out`` (float32 [n, block_elems]). The float32 expressions follow gguf-py's order of
# operations exactly (d * q + m, not m + q * d): that is what makes the results bitwise equal,
# NaN payloads included.
# --------------------------------------------------------------------------------------------

# Q4_0: x = d * (q - 8), q a 4-bit code.
BLOCK_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", QK // 2)])


def _dequantize_q4_0(b: np.ndarray, out: np.ndarray) -> None:
    q = _nibbles(b["qs"]).reshape(len(b), QK).view(np.int8)
    q -= np.int8(8)
    np.multiply(_f32(b["d"]), q, out=out)


# Q4_1: x = d * q + m, q a 4-bit code.
BLOCK_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", QK // 2)])


def _dequantize_q4_1(b: np.ndarray, out: np.ndarray) -> None:
    q = _nibbles(b["qs"]).reshape(len(b), QK)
    np.multiply(_f32(b["d"]), q, out=out)
    np.add(out, _f32(b["m"]), out=out)


# Q5_0: x = d * (q - 16), q a 5-bit code: low 4 bits in qs (as Q4_0), bit 4 of weight j is
# bit j of the little-endian 32-bit word qh.
BLOCK_Q5_0 = np.dtype([("d", "<f2"), ("qh", "u1", 4), ("qs", "u1", QK // 2)])


def _five_bit_codes(b: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1 blocks ``[n]`` -> uint8 codes ``[n, 32]`` in 0..31."""
    q = _nibbles(b["qs"]).reshape(len(b), QK)
    high = np.unpackbits(b["qh"], axis=-1, bitorder="little")  # [n, 32]: bit j of qh
    q |= high << np.uint8(4)
    return q


def _dequantize_q5_0(b: np.ndarray, out: np.ndarray) -> None:
    q = _five_bit_codes(b).view(np.int8)
    q -= np.int8(16)
    np.multiply(_f32(b["d"]), q, out=out)


# Q5_1: x = d * q + m, q a 5-bit code packed as in Q5_0.
BLOCK_Q5_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "u1", 4), ("qs", "u1", QK // 2)])


def _dequantize_q5_1(b: np.ndarray, out: np.ndarray) -> None:
    np.multiply(_f32(b["d"]), _five_bit_codes(b), out=out)
    np.add(out, _f32(b["m"]), out=out)


# Q8_0: x = q * d, q a signed byte.
BLOCK_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", QK)])


def _dequantize_q8_0(b: np.ndarray, out: np.ndarray) -> None:
    np.multiply(b["qs"], _f32(b["d"]), out=out)


# K-quants: a super-block of 256 weights in 16 or 8 sub-blocks, each with its own small
# integer scale (and min), which the float16 super-block scales d (and dmin) multiply.

# Q2_K: 16 sub-blocks of 16; x = (d * sc) * q - (dmin * mn), q a 2-bit code; scales[i] holds
# sc (low nibble) and mn (high nibble) of sub-block i. The codes come in two halves of 128:
# byte l of a half's 32 bytes holds weights l, l + 32, l + 64, l + 96 (bit pairs 0..3).
BLOCK_Q2_K = np.dtype(
    [("scales", "u1", QK_K // 16), ("qs", "u1", QK_K // 4), ("d", "<f2"), ("dmin", "<f2")]
)


def _dequantize_q2_k(b: np.ndarray, out: np.ndarray) -> None:
    n = len(b)
    scales = b["scales"]
    dl = _f32(b["d"]) * (scales & np.uint8(0x0F)).astype(np.float32)  # [n, 16]
    ml = _f32(b["dmin"]) * (scales >> np.uint8(4)).astype(np.float32)
    q = _crumbs(b["qs"].reshape(n, 2, 32)).reshape(n, 16, 16)
    o = out.reshape(n, 16, 16)
    np.multiply(dl[:, :, None], q, out=o)
    np.subtract(o, ml[:, :, None], out=o)


# Q3_K: 16 sub-blocks of 16; x = (d * (sc - 32)) * (q - 4 * (1 - h)), q a 2-bit code laid
# out as in Q2_K, h bit s of hmask[l] for weight 32 * s + l. The 16 6-bit scales sc: low 4
# bits in the nibbles of scales[0:8] (low nibbles are sc 0..7), high 2 bits in the bit pairs
# of scales[8:12] (pair p of byte 8 + i is sc 4 * p + i).
BLOCK_Q3_K = np.dtype(
    [("hmask", "u1", QK_K // 8), ("qs", "u1", QK_K // 4), ("scales", "u1", 12), ("d", "<f2")]
)


def _dequantize_q3_k(b: np.ndarray, out: np.ndarray) -> None:
    n = len(b)
    scales = b["scales"]
    low = _nibbles(scales[:, :8]).reshape(n, 16)
    high = _crumbs(scales[:, 8:]).reshape(n, 16)
    sc = (low | (high << np.uint8(4))).view(np.int8) - np.int8(32)
    dl = _f32(b["d"]) * sc.astype(np.float32)  # [n, 16]
    ql = _crumbs(b["qs"].reshape(n, 2, 32)).reshape(n, 256).view(np.int8)
    no_high = _bit_planes(b["hmask"]).reshape(n, 256) ^ np.uint8(1)
    ql -= (no_high << np.uint8(2)).view(np.int8)
    o = out.reshape(n, 16, 16)
    np.multiply(dl[:, :, None], ql.reshape(n, 16, 16), out=o)


# Q4_K: 8 sub-blocks of 32; x = (d * sc) * q - (dmin * mn), q a 4-bit code. Run c of 32 qs
# bytes holds sub-block 2c (low nibbles) and 2c + 1 (high nibbles). The 8 6-bit scales sc
# and mins mn are packed in 12 bytes (ggml's get_scale_min_k4), see _scales_mins_k4.
BLOCK_Q4_K = np.dtype(
    [("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", QK_K // 2)]
)


def _scales_mins_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K packed scales uint8 ``[n, 12]`` -> (sc, mn) float32 ``[n, 8]`` each.

    Bytes 0-3: sc 0..3 (low 6 bits), high 2 bits of sc 4..7; bytes 4-7: mn 0..3, high 2 bits
    of mn 4..7; bytes 8-11: low nibble sc 4..7, high nibble mn 4..7.
    """
    s = scales.reshape(-1, 3, 4)
    a, m, lo = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([a & 0x3F, (lo & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (lo >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _dequantize_q4_k(b: np.ndarray, out: np.ndarray) -> None:
    n = len(b)
    sc, mn = _scales_mins_k4(b["scales"])
    dl = _f32(b["d"]) * sc
    ml = _f32(b["dmin"]) * mn
    q = _nibbles(b["qs"].reshape(n, 4, 32)).reshape(n, 8, 32)
    o = out.reshape(n, 8, 32)
    np.multiply(dl[:, :, None], q, out=o)
    np.subtract(o, ml[:, :, None], out=o)


# Q5_K: Q4_K plus a fifth bit: bit 4 of weight 32 * s + l is bit s of qh[l].
BLOCK_Q5_K = np.dtype(
    [
        ("d", "<f2"),
        ("dmin", "<f2"),
        ("scales", "u1", 12),
        ("qh", "u1", QK_K // 8),
        ("qs", "u1", QK_K // 2),
    ]
)


def _dequantize_q5_k(b: np.ndarray, out: np.ndarray) -> None:
    n = len(b)
    sc, mn = _scales_mins_k4(b["scales"])
    dl = _f32(b["d"]) * sc
    ml = _f32(b["dmin"]) * mn
    q = _nibbles(b["qs"].reshape(n, 4, 32)).reshape(n, 8, 32)
    q |= _bit_planes(b["qh"]) << np.uint8(4)
    o = out.reshape(n, 8, 32)
    np.multiply(dl[:, :, None], q, out=o)
    np.subtract(o, ml[:, :, None], out=o)


# Q6_K: 16 sub-blocks of 16; x = (d * sc) * (q - 32), sc a signed byte, q a 6-bit code, in
# two halves of 128 weights: the low 4 bits of weight l (l < 128) are the nibbles of the
# half's 64 ql bytes (as _nibbles), its high 2 bits the bit pairs of the half's 32 qh bytes.
BLOCK_Q6_K = np.dtype(
    [("ql", "u1", QK_K // 2), ("qh", "u1", QK_K // 4), ("scales", "i1", QK_K // 16), ("d", "<f2")]
)


def _dequantize_q6_k(b: np.ndarray, out: np.ndarray) -> None:
    n = len(b)
    dl = _f32(b["d"]) * b["scales"].astype(np.float32)  # [n, 16]
    q = _nibbles(b["ql"].reshape(n, 2, 64)).reshape(n, 256)
    q |= _crumbs(b["qh"].reshape(n, 2, 32)).reshape(n, 256) << np.uint8(4)
    q = q.view(np.int8)
    q -= np.int8(32)
    o = out.reshape(n, 16, 16)
    np.multiply(dl[:, :, None], q.reshape(n, 16, 16), out=o)


# qtype -> (layout, weights per block, dequantizer)
_BLOCK_TYPES: dict[QT, tuple[np.dtype, int, Callable[[np.ndarray, np.ndarray], None]]] = {
    QT.Q4_0: (BLOCK_Q4_0, QK, _dequantize_q4_0),
    QT.Q4_1: (BLOCK_Q4_1, QK, _dequantize_q4_1),
    QT.Q5_0: (BLOCK_Q5_0, QK, _dequantize_q5_0),
    QT.Q5_1: (BLOCK_Q5_1, QK, _dequantize_q5_1),
    QT.Q8_0: (BLOCK_Q8_0, QK, _dequantize_q8_0),
    QT.Q2_K: (BLOCK_Q2_K, QK_K, _dequantize_q2_k),
    QT.Q3_K: (BLOCK_Q3_K, QK_K, _dequantize_q3_k),
    QT.Q4_K: (BLOCK_Q4_K, QK_K, _dequantize_q4_k),
    QT.Q5_K: (BLOCK_Q5_K, QK_K, _dequantize_q5_k),
    QT.Q6_K: (BLOCK_Q6_K, QK_K, _dequantize_q6_k),
}

# Unquantized types: one weight per "block"; the dtype whose bits they are.
_FLOAT_TYPES: dict[QT, np.dtype] = {
    QT.F32: np.dtype("<f4"),
    QT.F16: np.dtype("<f2"),
    QT.BF16: np.dtype("<u2"),  # NumPy has no bfloat16: the upper half of a float32's bits
}

BLOCKS: dict[QT, tuple[int, int]] = {
    **{t: (1, dt.itemsize) for t, dt in _FLOAT_TYPES.items()},
    **{t: (elems, layout.itemsize) for t, (layout, elems, _) in _BLOCK_TYPES.items()},
}
"""qtype -> (block_elems, block_bytes), for every type ``dequantize`` supports."""

_QUANTIZABLE = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0)


def _qtype(qtype: object, operation: str) -> QT:
    """Normalize an int / GGMLQuantizationType; UnsupportedQuantError for unknown types."""
    try:
        t = QT(qtype)
    except ValueError:
        raise UnsupportedQuantError(qtype, operation) from None
    if t not in BLOCKS:
        raise UnsupportedQuantError(t, operation)
    return t


def row_bytes(qtype: GGMLQuantizationType, n: int) -> int:
    """Bytes of a row of ``n`` weights of ``qtype``; ValueError if ``n`` is not whole blocks."""
    t = _qtype(qtype, "row size")
    elems, nbytes = BLOCKS[t]
    if n < 0 or n % elems:
        raise ValueError(
            f"{t.name} row of {n} weights is not a whole number of {elems}-weight blocks"
        )
    return n // elems * nbytes


# --------------------------------------------------------------------------------------------
# dequantize
# --------------------------------------------------------------------------------------------


def _decode_float(t: QT, bits: np.ndarray) -> np.ndarray:
    """F32 / F16 / BF16 bits ``[..., n]`` (their _FLOAT_TYPES dtype) -> new float32 ``[..., n]``."""
    if t == QT.BF16:  # the 16 bits are the top half of a float32
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return bits.astype(np.float32)  # a copy even for F32


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Decode GGUF tensor data: uint8 ``[..., row_bytes]`` -> float32 ``[..., row_elems]``.

    F32 also accepts float32 and F16 float16 data, BF16 uint16 (the raw bits), shaped
    ``[..., row_elems]``. Always returns a new array. Raises UnsupportedQuantError for a type
    without a dequantizer and ValueError for a row that is not a whole number of blocks.
    """
    t = _qtype(qtype, "dequantization")
    data = np.asarray(data)
    if data.ndim == 0:
        raise ValueError(f"{t.name} data must have at least one dimension, got a scalar")
    own = _FLOAT_TYPES.get(t)
    if own is not None and data.dtype == own:
        return _decode_float(t, data)
    if data.dtype != np.uint8:
        raise ValueError(f"{t.name} data must be uint8 bytes, got dtype {data.dtype}")
    elems, nbytes = BLOCKS[t]
    if data.shape[-1] % nbytes:
        raise ValueError(
            f"{t.name} row of {data.shape[-1]} bytes is not a whole number of "
            f"{nbytes}-byte blocks"
        )
    data = np.ascontiguousarray(data)
    if own is not None:
        return _decode_float(t, data.view(own))

    layout, _, decode = _BLOCK_TYPES[t]
    blocks = data.reshape(-1).view(layout)
    out = np.empty((*data.shape[:-1], data.shape[-1] // nbytes * elems), np.float32)
    flat = out.reshape(len(blocks), elems)
    step = max(1, _CHUNK_WEIGHTS // elems)
    with np.errstate(all="ignore"):  # NaN / Inf scales decode to NaN / Inf, as in ggml
        for start in range(0, len(blocks), step):
            decode(blocks[start : start + step], flat[start : start + step])
    return out


# --------------------------------------------------------------------------------------------
# quantize
# --------------------------------------------------------------------------------------------


def _first_non_finite(x: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])


# The float32 just below 0.5: trunc(v + copysign(_JUST_BELOW_HALF, v)) is C's roundf (ties
# away from zero) for every float32 |v| < 256 (checked exhaustively), where adding 0.5
# itself would round 0.49999997 up to 1.
_JUST_BELOW_HALF = np.nextafter(np.float32(0.5), np.float32(0))


def _quantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """float32 ``[n, 32]`` -> Q8_0 blocks ``[n]``, as ggml's quantize_row_q8_0_ref."""
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore", over="ignore"):
        inv_d = np.where(d == 0, np.float32(0), np.float32(1) / d)
    # 1/d overflows for blocks below ~3.7e-37: ggml (and gguf-py) then cast inf/NaN codes to
    # int8, which yields 0 on x86; d rounds to float16 zero there anyway. Write that 0.
    inv_d[np.isinf(inv_d)] = 0
    v = blocks * inv_d  # |v| <= 127 (+ rounding)
    v += np.copysign(_JUST_BELOW_HALF, v)
    out = np.empty(len(blocks), BLOCK_Q8_0)
    out["d"] = d[:, 0]
    out["qs"] = v  # float -> int8 truncates: with the bias above, C's roundf
    return out


def _quantize_q8_0_x86(blocks: np.ndarray) -> np.ndarray:
    """float32 ``[n, 32]`` -> Q8_0 blocks ``[n]``, as ggml-cpu's x86 quantize_row_q8_0 (AVX,
    AVX2, AVX-512: ``ggml/src/ggml-cpu/arch/x86/quants.c``): ``d = max / 127`` as in the
    reference, but each weight is multiplied by ``127 / max`` (not ``1 / d``) and rounded half
    to even (``_mm256_round_ps``), not half away from zero. This is what llama.cpp's CPU backend
    runs when it writes a Q8_0 KV cache and converts a query for a Q8_0 / Q4_0 dot product.
    """
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.where(amax == 0, np.float32(0), np.float32(127) / amax)
    # 127 / max overflows for blocks below ~3.7e-37, whose d is float16 zero: the codes then
    # do not matter to any product; write 0 as the reference quantizer does.
    inv[np.isinf(inv)] = 0
    out = np.empty(len(blocks), BLOCK_Q8_0)
    out["d"] = (amax / np.float32(127))[:, 0]
    out["qs"] = np.rint(blocks * inv)  # |v| <= 127 (+ rounding), exact in int8
    return out


def _quantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """float32 ``[n, 32]`` -> Q4_0 blocks ``[n]``, as ggml's quantize_row_q4_0_ref.

    d = -max / 8 where max is the (first) weight of largest magnitude, so that weight gets
    code 0 and the others 0..15 by truncating x / d + 8.5.
    """
    n = len(blocks)
    first_max = np.abs(blocks).argmax(axis=1)[:, None]
    peak = np.take_along_axis(blocks, first_max, axis=1)
    d = peak / np.float32(-8)
    with np.errstate(divide="ignore", over="ignore"):
        inv_d = np.where(d == 0, np.float32(0), np.float32(1) / d)
    overflow = np.isinf(inv_d)[:, 0]  # see _quantize_q8_0: ggml writes code 0 there
    inv_d[overflow] = 0
    v = blocks * inv_d
    v += np.float32(8.5)  # in [0.5, 16.5): float -> uint8 truncates
    q = np.minimum(v.astype(np.uint8), np.uint8(15))
    q[overflow] = 0
    out = np.empty(n, BLOCK_Q4_0)
    out["d"] = d[:, 0]
    out["qs"] = q[:, : QK // 2] | (q[:, QK // 2 :] << np.uint8(4))
    return out


def quantize(x: np.ndarray, qtype: GGMLQuantizationType, *, runtime: bool = False) -> np.ndarray:
    """Encode float weights: ``[..., row_elems]`` -> uint8 ``[..., row_bytes]``.

    ``x`` is rounded to float32 first (ggml quantizes float32). F32, F16 and BF16 are plain
    conversions (round to nearest even; NaN and Inf kept, BF16 quiets NaN as ggml does).
    Q8_0 and Q4_0 raise ValueError naming the first non-finite element, since a block
    scale computed from it would be garbage; finite input gives gguf-py's bytes exactly,
    including float16 scale overflow to Inf for blocks beyond ~8e6 (Q8_0) / ~5e5 (Q4_0).

    ``runtime=True``: Q8_0 as llama.cpp's CPU backend quantizes at run time on x86
    (:func:`_quantize_q8_0_x86`: its KV cache and its queries), not as gguf-py and
    ``quantize_row_q8_0_ref`` do; the two differ in rare elements that sit on a rounding tie.
    Q4_0's run-time quantizer is the reference one, so the flag changes nothing there.
    """
    t = _qtype(qtype, "quantization")
    if t not in _QUANTIZABLE:
        raise UnsupportedQuantError(t, "quantization")
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"{t.name} input must have at least one dimension, got a scalar")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{t.name} input must be real numbers, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    elems, _ = BLOCKS[t]
    if x.shape[-1] % elems:
        raise ValueError(
            f"{t.name} row of {x.shape[-1]} weights is not a whole number of "
            f"{elems}-weight blocks"
        )
    out_shape = (*x.shape[:-1], row_bytes(t, x.shape[-1]))

    if t == QT.F32:
        return x.view(np.uint8).reshape(out_shape).copy()
    if t == QT.F16:
        with np.errstate(over="ignore"):  # beyond +-65504 is Inf in float16, as in ggml
            return x.astype("<f2").view(np.uint8).reshape(out_shape)
    if t == QT.BF16:
        n = x.view(np.uint32)
        is_nan = (n & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        # ggml: a NaN keeps sign and top bits and gets the quiet bit; then round to nearest
        # even on the dropped 16 bits (no carry out of 32 bits is possible after the NaN fix).
        n = np.where(is_nan, (n & np.uint32(0xFFFF0000)) | np.uint32(0x00400000), n)
        n = (n + (np.uint32(0x7FFF) + ((n >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
        return n.astype("<u2").view(np.uint8).reshape(out_shape)

    if not np.isfinite(x).all():
        raise ValueError(
            f"{t.name} quantization of non-finite input: first at index {_first_non_finite(x)}"
        )
    if t == QT.Q8_0:
        encode = _quantize_q8_0_x86 if runtime else _quantize_q8_0
    else:
        encode = _quantize_q4_0
    with np.errstate(over="ignore", under="ignore"):  # float16 scale over/underflow, as ggml
        blocks = encode(x.reshape(-1, elems))
    return blocks.view(np.uint8).reshape(out_shape)


# --------------------------------------------------------------------------------------------
# MLX affine group quantization (mx.quantize / mx.dequantize, mode="affine")
# --------------------------------------------------------------------------------------------

_AFFINE_BITS = (2, 4, 8)
_AFFINE_GROUP_SIZES = (32, 64, 128)
_AFFINE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_MLX_HALF_NAN = 0x7D00


def _mlx_half(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 as MLX's float16 type off ARM (_MLX_Float16) converts: round to
    nearest even, but every NaN becomes sign | 0x7D00 (NumPy would keep the payload)."""
    h = x.astype(np.float16)
    nan = np.isnan(h)
    if nan.any():
        bits = h.view(np.uint16)
        bits[nan] = (bits[nan] & np.uint16(0x8000)) | np.uint16(_MLX_HALF_NAN)
    return h


def _check_affine_args(bits: int, group_size: int) -> None:
    if bits not in _AFFINE_BITS:
        raise ValueError(f"affine quantization bits must be one of {_AFFINE_BITS}, got {bits}")
    if group_size not in _AFFINE_GROUP_SIZES:
        raise ValueError(
            f"affine quantization group_size must be one of {_AFFINE_GROUP_SIZES}, "
            f"got {group_size}"
        )


def quantize_affine(
    x: np.ndarray, bits: int = 4, group_size: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MLX's affine quantization of ``x`` (float32 or float16 ``[..., d]``) in groups.

    Returns ``(packed, scales, biases)``: packed uint32 ``[..., d * bits / 32]`` (weight k of
    a word in bits ``k * bits`` upward), scales and biases ``[..., d / group_size]`` in the
    dtype of ``x``; a weight decodes as ``scale * q + bias``. The arithmetic is float32,
    as MLX's CPU kernel: scale = (max - min) / (2^bits - 1) (at least 1e-7), signed so that
    the group's edge of larger magnitude gets an exact code q0 = rint(edge / scale); if
    q0 != 0 the scale is refit to edge / q0 and the bias is that edge (else 0); then
    q = clip(rint((x - bias) / scale), 0, 2^bits - 1). Non-finite input raises ValueError.
    """
    _check_affine_args(bits, group_size)
    x = np.asarray(x)
    if x.dtype not in _AFFINE_DTYPES:
        raise ValueError(f"affine quantization takes float32 or float16, got dtype {x.dtype}")
    if x.ndim == 0 or x.shape[-1] % group_size:
        raise ValueError(
            f"affine quantization: last dimension {x.shape[-1:]} is not a multiple of "
            f"group_size {group_size}"
        )
    if not np.isfinite(x).all():
        raise ValueError(
            f"affine quantization of non-finite input: first at index {_first_non_finite(x)}"
        )
    n_bins = np.float32((1 << bits) - 1)
    n_groups = x.shape[-1] // group_size
    g = x.astype(np.float32).reshape(*x.shape[:-1], n_groups, group_size)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        w_max = g.max(axis=-1)
        w_min = g.min(axis=-1)
        min_is_edge = np.abs(w_min) > np.abs(w_max)
        scale = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
        scale = np.where(min_is_edge, scale, -scale)
        edge = np.where(min_is_edge, w_min, w_max)
        q0 = np.rint(edge / scale)
        refit = q0 != 0
        scale = np.where(refit, edge / np.where(refit, q0, np.float32(1)), scale)
        bias = np.where(refit, edge, np.float32(0))
        q = np.rint((g - bias[..., None]) / scale[..., None])
    q = np.clip(q, 0, n_bins).astype(np.uint8)
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * np.uint8(bits))
    packed_bytes = (q.reshape(*x.shape[:-1], x.shape[-1] // per_byte, per_byte) << shifts).sum(
        axis=-1, dtype=np.uint8
    )  # the codes' bits are disjoint, so the sum is their OR
    packed = packed_bytes.view("<u4").astype(np.uint32)
    return packed, scale.astype(x.dtype), bias.astype(x.dtype)


def dequantize_affine(
    packed: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    bits: int = 4,
    group_size: int = 64,
) -> np.ndarray:
    """Inverse of ``quantize_affine``: ``scale * q + bias`` per weight, as ``mx.dequantize``.

    packed uint32 ``[..., d * bits / 32]``, scales and biases ``[..., d / group_size]``
    (float32 or float16, the same) -> ``[..., d]`` in that dtype. The product and the sum
    are each rounded to that dtype (MLX computes in it), so float16 is not float32 rounded.
    A NaN float16 result is written as MLX on x86 writes it (sign | 0x7D00).
    """
    _check_affine_args(bits, group_size)
    packed, scales, biases = np.asarray(packed), np.asarray(scales), np.asarray(biases)
    if packed.dtype != np.uint32:
        raise ValueError(f"affine packed weights must be uint32, got dtype {packed.dtype}")
    if scales.dtype not in _AFFINE_DTYPES or biases.dtype != scales.dtype:
        raise ValueError(
            f"affine scales and biases must both be float32 or float16, got "
            f"{scales.dtype} and {biases.dtype}"
        )
    d = packed.shape[-1] * 32 // bits if packed.ndim else 0
    expected = (*packed.shape[:-1], d // group_size)
    if (
        packed.ndim == 0
        or d % group_size
        or scales.shape != expected
        or biases.shape != expected
    ):
        raise ValueError(
            f"affine shapes disagree: packed {packed.shape} ({bits} bits, group_size "
            f"{group_size}) needs scales and biases {expected}, got {scales.shape} and "
            f"{biases.shape}"
        )
    per_byte = 8 // bits
    codes = np.ascontiguousarray(packed).astype("<u4").view(np.uint8)
    shifts = (np.arange(per_byte, dtype=np.uint8) * np.uint8(bits))
    q = (codes[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    q = q.reshape(*packed.shape[:-1], d // group_size, group_size)
    with np.errstate(over="ignore", invalid="ignore"):
        if scales.dtype == np.float32:
            w = q * scales[..., None]
            w += biases[..., None]
        else:
            # MLX's float16 arithmetic: each operation in float32, rounded back to float16.
            w = _mlx_half(q * scales.astype(np.float32)[..., None])
            w = _mlx_half(w.astype(np.float32) + biases.astype(np.float32)[..., None])
    return w.reshape(*packed.shape[:-1], d)
