"""llama.cpp's Q8_0 and Q4_0 blocks in MLX operations, for the q8_0 / q4_0 KV caches.

Mirrors the Q8_0 / Q4_0 part of :mod:`quantref.quants`. A block is 32 weights and one float16
scale ``d``; where NumPy packs them into ggml's bytes, the MLX cache keeps the two fields as two
arrays (the same bits and the same size), and :func:`to_ggml_bytes` packs them for a
byte-for-byte comparison with the oracle.

- Q8_0: ``d = max|x| / 127``, ``q = roundf(x / d)`` (ties away from zero), decode ``q * d``;
  or as llama.cpp's x86 run time quantizes (``runtime=True``): ``q = rint(x * (127 / max))``.
- Q4_0: ``d = m / -8`` with ``m`` the first weight of largest magnitude,
  ``q = min(15, trunc(x / d + 8.5))``, decode ``(q - 8) * d``.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

__all__ = ["QK", "dequantize", "from_ggml_bytes", "quantize", "to_ggml_bytes"]

QK = 32  # weights per block
# The float32 just below 0.5: trunc(v + copysign(it, v)) is C's roundf for |v| < 256.
_JUST_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))


def _blocks(x: mx.array) -> mx.array:
    if x.shape[-1] % QK:
        raise ValueError(f"rows of {x.shape[-1]} values are not a whole number of {QK}-blocks")
    return x.astype(mx.float32).reshape(*x.shape[:-1], x.shape[-1] // QK, QK)


def _inverse(d: mx.array) -> tuple[mx.array, mx.array]:
    """(1/d with 0 where d is 0 or 1/d overflows, the overflow mask): ggml writes code 0 for
    a block whose 1/d overflows."""
    inv = mx.where(d == 0, mx.array(0.0, mx.float32), mx.array(1.0, mx.float32) / d)
    overflow = mx.isinf(inv)
    return mx.where(overflow, mx.array(0.0, mx.float32), inv), overflow


def quantize(x: mx.array, qtype: str, *, runtime: bool = False) -> tuple[mx.array, mx.array]:
    """``x [..., n]`` -> ``(codes [..., n/32, 32], d float16 [..., n/32])``.

    Q8_0 codes are int8; Q4_0 codes are uint8 in 0..15. ``runtime=True``: Q8_0 as llama.cpp's
    CPU backend quantizes at run time on x86 (its KV cache and its queries): each weight times
    ``127 / max``, rounded half to even (``mx.round``); see
    :func:`quantref.quants._quantize_q8_0_x86`. Q4_0 is the same either way.
    """
    b = _blocks(x)
    if qtype == "q8_0" and runtime:
        amax = mx.abs(b).max(axis=-1, keepdims=True)
        inv = mx.where(amax == 0, mx.array(0.0, mx.float32), mx.array(127.0, mx.float32) / amax)
        inv = mx.where(mx.isinf(inv), mx.array(0.0, mx.float32), inv)  # d is float16 0 there
        return mx.round(b * inv).astype(mx.int8), (amax[..., 0] / 127.0).astype(mx.float16)
    if qtype == "q8_0":
        d = mx.abs(b).max(axis=-1, keepdims=True) / 127.0
        v = b * _inverse(d)[0]
        v = v + mx.where(v < 0, -_JUST_BELOW_HALF, _JUST_BELOW_HALF)
        return v.astype(mx.int8), d[..., 0].astype(mx.float16)
    if qtype == "q4_0":
        first = mx.argmax(mx.abs(b), axis=-1, keepdims=True)
        d = mx.take_along_axis(b, first, axis=-1) / -8.0
        inv, overflow = _inverse(d)
        v = b * inv + 8.5
        q = mx.minimum(v.astype(mx.uint8), 15)
        q = mx.where(overflow, mx.array(0, mx.uint8), q)
        return q, d[..., 0].astype(mx.float16)
    raise ValueError(f"unknown ggml KV type {qtype!r}; one of q8_0, q4_0")


def dequantize(codes: mx.array, d: mx.array, qtype: str) -> mx.array:
    """``(codes [..., nb, 32], d [..., nb])`` -> float32 ``[..., nb * 32]``."""
    q = codes.astype(mx.float32)
    if qtype == "q4_0":
        q = q - 8.0
    out = q * d.astype(mx.float32)[..., None]
    return out.reshape(*codes.shape[:-2], codes.shape[-2] * QK)


def to_ggml_bytes(codes: mx.array, d: mx.array, qtype: str) -> np.ndarray:
    """ggml's block bytes ``uint8 [..., nb * block_bytes]`` of MLX blocks (for comparisons)."""
    codes, d = np.array(codes), np.array(d).astype("<f2")
    if qtype == "q4_0":
        codes = (codes[..., : QK // 2] | (codes[..., QK // 2:] << 4)).astype(np.uint8)
    body = codes.view(np.uint8)
    blocks = np.concatenate([d[..., None].view(np.uint8), body], axis=-1)
    return blocks.reshape(*blocks.shape[:-2], -1)


def from_ggml_bytes(blocks: np.ndarray, qtype: str) -> tuple[mx.array, mx.array]:
    """The inverse of :func:`to_ggml_bytes`: ggml bytes ``[..., nb * block_bytes]`` ->
    ``(codes [..., nb, 32], d float16 [..., nb])``."""
    body = 32 if qtype == "q8_0" else 16
    b = np.ascontiguousarray(blocks).reshape(*blocks.shape[:-1], -1, 2 + body)
    d = b[..., :2].copy().view("<f2")[..., 0]
    if qtype == "q8_0":
        codes = b[..., 2:].copy().view(np.int8)
    else:
        packed = b[..., 2:]
        codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.uint8)
    return mx.array(codes), mx.array(d.astype(np.float16))
