"""turbo_kv in MLX: quant.cpp's key blocks and value formats, byte-identical with the oracle.

Mirrors :mod:`quantref.turbo_kv` name for name (the format is described there, in
``docs/oracle.md`` and in ``shared/docs/turbo_kv_format.md``); inputs and outputs are ``mx.array``
and every function only builds lazy graph nodes, so that the KV cache can call them inside the
graph of a decode step and evaluate once per step.

Exactness. For the same float32 keys the blocks are the oracle's, byte for byte, and dequantized
keys are bit-identical; scores agree to the summation order of a dot product (float32 here,
float64 in the oracle). Every step that the format fixes is one IEEE float32 rounding per
operation in quant.cpp's order:

- On the CPU the graph is made of MLX operations, each evaluated on its own (no ``mx.compile``:
  a fused kernel may contract ``a * b + c`` into a fused multiply-add). The norm is
  ``mx.cumsum(x * x)[..., -1]``, which MLX's CPU backend evaluates sequentially, exactly like the
  C loop (``mx.sum`` is free to reorder); the butterfly is done stage by stage.
- On a GPU the quantizer and the dequantizer are custom kernels (``mx.fast.cuda_kernel`` /
  ``mx.fast.metal_kernel``), one thread per 128-element chunk, written with explicitly rounded
  operations (CUDA ``__fmul_rn``, ``__fadd_rn``, ``__fsub_rn``, ``__fdiv_rn``, ``__fsqrt_rn``,
  which NVRTC never contracts or approximates; Metal ``precise::`` functions under safe math and
  ``fp contract(off)``). The CPU's graph evaluated on an H100 gives ~1e-4 of the blocks
  differently (its cumsum is a parallel scan), hence the kernels. The kernel runs when
  ``mx.default_device()`` is a GPU and CUDA or Metal is available. The CUDA kernels were checked
  on an H100 (``bench/turbo_kv_gpu_check.py``); the Metal kernels are a faithful port that has
  never run (no Apple machine).

Scores are float32 matmuls. MLX runs those in TF32 on CUDA (and on Apple M5 GPUs) unless the
environment has ``MLX_ENABLE_TF32=0`` when the process makes its first matmul; with TF32 the
scores are about 4e-4 of a row's largest score away from the oracle (measured on an H100), with
it off within float32 rounding. That switch is process-wide and is the caller's to set.

Laziness. No function here evaluates or transfers anything to the host (no ``mx.eval``,
``.item()``, NumPy conversion): shapes, dtypes, ``kind``, ``path`` and ``d`` are checked eagerly,
but checks that need the data (non-finite input, non-zero reserved bytes of a block, indices out
of range) cannot happen in a lazy graph and are the caller's business; pass ``check=True`` to run
them (it evaluates the input, for debugging and tests). Non-finite keys give unspecified blocks.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import mlx.core as mx
import numpy as np

from quantref import turbo_kv as _oracle

from . import kernels
from quantref.turbo_kv import (
    BLOCK,
    CENT_MAX,
    CENTROIDS,
    HEADER_BYTES,
    INT8_RECIP,
    INT8_TABLES,
    KINDS,
    PATHS,
    Q2_LEVELS,
    V_GROUP,
    V_TYPES,
    bits,
    block_bytes,
    block_dtype,
    v_bytes,
)

__all__ = [
    "BLOCK",
    "CENTROIDS",
    "CENT_MAX",
    "HEADER_BYTES",
    "INT8_RECIP",
    "INT8_TABLES",
    "KINDS",
    "PATHS",
    "Q2_LEVELS",
    "V_GROUP",
    "V_TYPES",
    "bits",
    "block_bytes",
    "block_dtype",
    "dequantize",
    "dequantize_v",
    "f16_decode",
    "f16_trunc",
    "inverse_rotate",
    "nearest_centroid",
    "pack_indices",
    "quantize",
    "quantize_v",
    "rotate",
    "scores",
    "unpack_indices",
    "v_bytes",
]

_EPS = np.float32(1e-10)  # quant.cpp's 1e-10f guards (norm, max |r|, decoded scale)
_Q4_MAX = np.float32(7.0)
_V_PACKED = {"q4": 16, "q2": 8}  # packed code bytes per 32-value group (after a float32 scale)
_SAFE_ABS = 2.0 ** 16  # below this the codebook search is a threshold count (see _thresholds)
# The float32 just below 0.5: trunc(v + copysign(it, v)) is C's roundf for every float32 v.
_JUST_BELOW_HALF = np.nextafter(np.float32(0.5), np.float32(0))


def _f32(v) -> mx.array:
    """A float32 scalar constant (the exact float32 of ``v``)."""
    return mx.array(np.float32(v))


def _n_chunks(d: int) -> int:
    return -(-d // BLOCK)


def _chunk_groups(d: int) -> list[tuple[int, int, int]]:
    """Runs of equal-length chunks of a ``d``-element head: ``(start, n_chunks, chunk_len)``.

    At most two: the full 128-element chunks, then the short last one.
    """
    groups = []
    if d // BLOCK:
        groups.append((0, d // BLOCK, BLOCK))
    if d % BLOCK:
        groups.append((d // BLOCK * BLOCK, 1, d % BLOCK))
    return groups


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


# ---------------------------------------------------------------------------------------------
# Argument checks (eager: shapes, dtypes, names; data checks only with check=True)
# ---------------------------------------------------------------------------------------------

def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown turbo_kv kind {kind!r}; one of {KINDS}")


def _check_v_type(v_type: str) -> None:
    if v_type not in V_TYPES:
        raise ValueError(f"unknown value type {v_type!r}; one of {V_TYPES}")


def _check_d(d) -> int:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
        raise TypeError(f"d must be an int, got {type(d).__name__}")
    if d <= 0:
        raise ValueError(f"d must be positive, got {d}")
    return int(d)


def _check_bits(nbits) -> int:
    if isinstance(nbits, bool) or not isinstance(nbits, (int, np.integer)) \
            or not 1 <= nbits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {nbits!r}")
    return int(nbits)


def _as_float32(x, name: str) -> mx.array:
    """float32 passes; float16 / bfloat16 are converted (exactly); float64 and the rest raise.

    As in the oracle, float64 is refused rather than rounded: which float32 a float64 becomes is
    the caller's choice to make visibly (``x.astype(mx.float32)``).
    """
    if not isinstance(x, mx.array):
        raise TypeError(f"{name} must be an mx.array, got {type(x).__name__}")
    if x.dtype == mx.float32:
        return x
    if x.dtype in (mx.float16, mx.bfloat16):
        return x.astype(mx.float32)
    if x.dtype == mx.float64:
        raise TypeError(f"{name} is float64; turbo_kv works on float32 as quant.cpp does: "
                        f"convert it explicitly ({name}.astype(mx.float32))")
    raise TypeError(f"{name} must be a float32 (or float16 / bfloat16) array, got {x.dtype}")


def _check_uint8(a, name: str) -> None:
    if not isinstance(a, mx.array) or a.dtype != mx.uint8:
        got = a.dtype if isinstance(a, mx.array) else type(a).__name__
        raise TypeError(f"{name} must be a uint8 mx.array, got {got}")


def _check_blocks_shape(blocks, kind: str, d: int, min_ndim: int = 2) -> None:
    _check_uint8(blocks, "blocks")
    bb, nc = block_bytes(kind), _n_chunks(d)
    if blocks.ndim < min_ndim:
        axes = "[..., N, n_chunks, bb]" if min_ndim == 3 else "[..., n_chunks, bb]"
        raise ValueError(f"blocks must be {axes} (bb = {bb}), got shape {blocks.shape}")
    if blocks.shape[-1] != bb:
        raise ValueError(f"{kind} blocks have {bb} bytes; got last axis {blocks.shape[-1]} "
                         f"(blocks of shape {blocks.shape})")
    if blocks.shape[-2] != nc:
        raise ValueError(f"d={d} needs {nc} block(s) per vector (128 elements each) but blocks "
                         f"of shape {blocks.shape} have {blocks.shape[-2]}: d is inconsistent "
                         f"with the blocks")


def _check_finite_now(x: mx.array, name: str) -> None:
    """``check=True`` only: evaluates ``x``; the oracle's ValueError names a non-finite element."""
    _oracle._check_finite(np.array(x), name)


def _check_blocks_now(blocks: mx.array, kind: str, d: int) -> None:
    """``check=True`` only: evaluates ``blocks``; reserved bytes and bytes past ``d`` must be 0."""
    _oracle._check_blocks(np.array(blocks), kind, d)


# ---------------------------------------------------------------------------------------------
# Truncating fp16 (the block header)
# ---------------------------------------------------------------------------------------------

def f16_trunc(x: mx.array) -> mx.array:
    """float32 ``[...]`` -> fp16 bit patterns uint16 ``[...]``, quant.cpp's header conversion.

    The low 13 mantissa bits are dropped (rounding toward zero); an exponent below fp16's normal
    range gives a signed zero, one above it a signed infinity (NaN too).
    """
    if not isinstance(x, mx.array) or x.dtype != mx.float32:
        raise TypeError(f"f16_trunc takes a float32 mx.array, got "
                        f"{x.dtype if isinstance(x, mx.array) else type(x).__name__}")
    u = mx.view(x, mx.uint32)
    sign = (u >> 16) & 0x8000
    e = ((u >> 23) & 0xFF).astype(mx.int32) - (127 - 15)
    mant = (u >> 13) & 0x3FF
    normal = sign | (mx.clip(e, 0, 31).astype(mx.uint32) << 10) | mant
    h = mx.where(e <= 0, sign, mx.where(e >= 31, sign | 0x7C00, normal))
    return h.astype(mx.uint16)


def f16_decode(h: mx.array) -> mx.array:
    """fp16 bit patterns uint16 ``[...]`` -> float32 ``[...]``, subnormals flushed to signed 0."""
    if not isinstance(h, mx.array) or h.dtype != mx.uint16:
        raise TypeError(f"f16_decode takes uint16 bit patterns (an mx.array), got "
                        f"{h.dtype if isinstance(h, mx.array) else type(h).__name__}")
    u = h.astype(mx.uint32)
    sign = (u & 0x8000) << 16
    e = (u >> 10) & 0x1F
    mant = u & 0x3FF
    bits32 = mx.where(e == 0, sign,
                      mx.where(e == 31, sign | 0x7F800000 | (mant << 13),
                               sign | ((e + (127 - 15)) << 23) | (mant << 13)))
    return mx.view(bits32.astype(mx.uint32), mx.float32)


def _header_bytes(norm16: mx.array, s16: mx.array) -> mx.array:
    """uint16 ``[...]`` norm and inv_std -> the 8 header bytes ``uint8 [..., 8]`` (LE, 0-padded)."""
    zero = mx.zeros(norm16.shape, mx.uint16)
    fields = mx.stack([norm16, zero, s16, zero], axis=-1)  # [..., 4]
    return mx.stack([fields & 0xFF, fields >> 8], axis=-1).astype(mx.uint8) \
        .reshape(*norm16.shape, HEADER_BYTES)


def _read_header(blocks: mx.array, cd: int) -> tuple[mx.array, mx.array]:
    """``blocks uint8 [..., bb]`` -> decoded ``(norm, s)`` float32 ``[...]`` (``s``: inv_std)."""
    h = blocks[..., :HEADER_BYTES].astype(mx.uint16)
    norm = f16_decode(h[..., 0] | (h[..., 1] << 8))
    s = f16_decode(h[..., 4] | (h[..., 5] << 8))
    s = mx.where(s < _f32(_EPS), _f32(np.sqrt(np.float32(cd))), s)  # never made by quantize
    return norm, s


# ---------------------------------------------------------------------------------------------
# The rotation: sign flip + Walsh-Hadamard butterfly + 1/sqrt(n2), float32, in the C order
# ---------------------------------------------------------------------------------------------

def _rotation_scale(n2: int) -> mx.array:
    return _f32(np.float32(1) / np.sqrt(np.float32(n2)))  # float32(1) / sqrtf(n2)


@lru_cache(maxsize=None)
def _signs(n2: int) -> mx.array:
    """float32 ``[n2]``: -1 at even positions, +1 at odd ones (multiplying by -1 is exact)."""
    return mx.array(np.where(np.arange(n2) % 2 == 0, -1.0, 1.0).astype(np.float32))


def _butterfly(y: mx.array) -> mx.array:
    """Unnormalised Walsh-Hadamard butterfly (Sylvester order) over the last axis.

    ``y float32 [..., n]`` (``n`` a power of two) -> ``float32 [..., n]``. Stage ``len = 1, 2,
    4, ...`` maps each pair ``(y[g+j], y[g+j+len])`` to ``(u + v, u - v)``: viewed as
    ``[..., n / 2len, 2, len]`` that is one add and one subtract per stage, each rounded once.
    """
    n, lead = y.shape[-1], y.shape[:-1]
    length = 1
    while length < n:
        pairs = y.reshape(*lead, n // (2 * length), 2, length)
        u, v = pairs[..., 0, :], pairs[..., 1, :]
        y = mx.stack([u + v, u - v], axis=-2).reshape(*lead, n)
        length *= 2
    return y


def _rotation_args(x, d, name: str) -> tuple[mx.array, int]:
    x = _as_float32(x, name)
    if x.ndim == 0:
        raise ValueError(f"{name} must have a vector axis, got a scalar")
    d = x.shape[-1] if d is None else _check_d(d)
    if d > x.shape[-1]:
        raise ValueError(f"d={d} is longer than {name}'s last axis ({x.shape[-1]})")
    return x, _pow2_floor(d)


def _with_head(x: mx.array, head: mx.array, n2: int) -> mx.array:
    return head if n2 == x.shape[-1] else mx.concatenate([head, x[..., n2:]], axis=-1)


def rotate(x: mx.array, d: int | None = None) -> mx.array:
    """quant.cpp's forward rotation of vectors of ``d`` elements (default: the last axis).

    ``x float32 [..., L]`` (``L >= d``) -> ``float32 [..., L]``. With ``n2`` the largest power of
    two ``<= d``, entries ``i < n2`` are negated for even ``i``, put through the butterfly and
    multiplied by ``float32(1) / sqrtf(n2)``; entries from ``n2`` on pass through.
    """
    x, n2 = _rotation_args(x, d, "x")
    head = _butterfly(x[..., :n2] * _signs(n2)) * _rotation_scale(n2)
    return _with_head(x, head, n2)


def inverse_rotate(x: mx.array, d: int | None = None) -> mx.array:
    """The inverse of :func:`rotate` in quant.cpp's order: scale, butterfly, signs.

    ``x float32 [..., L]`` (``L >= d``) -> ``float32 [..., L]``; entries from ``n2`` on pass
    through.
    """
    x, n2 = _rotation_args(x, d, "x")
    head = _butterfly(x[..., :n2] * _rotation_scale(n2)) * _signs(n2)
    return _with_head(x, head, n2)


def _rotate_chunks(q: mx.array, d: int) -> mx.array:
    """Queries ``float32 [..., d]`` -> each 128-element chunk rotated on its own."""
    parts = []
    for lo, k, cd in _chunk_groups(d):
        chunks = q[..., lo:lo + k * cd].reshape(*q.shape[:-1], k, cd)
        parts.append(rotate(chunks, cd).reshape(*q.shape[:-1], k * cd))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


# ---------------------------------------------------------------------------------------------
# Bit packing: one little-endian bit stream, LSB first
# ---------------------------------------------------------------------------------------------

def pack_indices(idx: mx.array, bits: int) -> mx.array:
    """Pack indices ``[..., n]`` (integers ``< 2**bits``) -> ``uint8 [..., ceil(n*bits/8)]``.

    Index ``i`` occupies stream bits ``[bits*i, bits*i + bits)``; stream bit ``k`` is bit
    ``k % 8`` of byte ``k // 8``; bits past the last index are 0. Done as the stream of single
    bits, regrouped into bytes. The range of the indices is not checked (that needs the data):
    bits from ``bits`` on are ignored.
    """
    nb = _check_bits(bits)
    if not isinstance(idx, mx.array) or not mx.issubdtype(idx.dtype, mx.integer):
        raise TypeError(f"indices must be an integer mx.array, got "
                        f"{idx.dtype if isinstance(idx, mx.array) else type(idx).__name__}")
    if idx.ndim == 0:
        raise ValueError("indices must have an element axis, got a scalar")
    lead, n = idx.shape[:-1], idx.shape[-1]
    n_bytes = -(-n * nb // 8)
    shifts = mx.arange(nb, dtype=mx.uint8)
    stream = ((idx.astype(mx.uint8)[..., None] >> shifts) & 1).reshape(*lead, n * nb)
    if n_bytes * 8 > n * nb:
        stream = mx.concatenate([stream, mx.zeros((*lead, n_bytes * 8 - n * nb), mx.uint8)],
                                axis=-1)
    weights = mx.array(1 << np.arange(8), mx.uint8)
    return (stream.reshape(*lead, n_bytes, 8) * weights).sum(axis=-1).astype(mx.uint8)


@lru_cache(maxsize=None)
def _unpack_plan(nb: int, n: int) -> tuple[mx.array, mx.array, mx.array]:
    """For index ``i``: its first byte, the byte after it, and its bit offset in the first."""
    pos = np.arange(n) * nb
    first = (pos // 8).astype(np.int32)
    return mx.array(first), mx.array(first + 1), mx.array((pos % 8).astype(np.uint16))


def unpack_indices(packed: mx.array, bits: int, n: int) -> mx.array:
    """The first ``n`` indices of bit streams ``uint8 [..., n_bytes]`` -> ``uint8 [..., n]``.

    An index spans at most two bytes (``bits <= 8``): each is read as the 16-bit little-endian
    word of its two bytes, shifted and masked.
    """
    nb = _check_bits(bits)
    _check_uint8(packed, "packed")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    need = -(-n * nb // 8)
    if packed.ndim == 0 or packed.shape[-1] < need:
        raise ValueError(f"{n} indices of {nb} bits need {need} bytes, got packed of shape "
                         f"{packed.shape}")
    lead = packed.shape[:-1]
    # one zero byte after the used ones, so that "the byte after" always exists
    stream = mx.concatenate([packed[..., :need], mx.zeros((*lead, 1), mx.uint8)], axis=-1)
    first, second, shift = _unpack_plan(nb, int(n))
    word = mx.take(stream, first, axis=-1).astype(mx.uint16) \
        | (mx.take(stream, second, axis=-1).astype(mx.uint16) << 8)
    return ((word >> shift) & ((1 << nb) - 1)).astype(mx.uint8)


# ---------------------------------------------------------------------------------------------
# The codebook search: first strict minimum of |t - C[j]| in float32
# ---------------------------------------------------------------------------------------------

def _float_key(bits32: np.ndarray) -> np.ndarray:
    """float32 bit patterns (int32) -> int32 keys in the order of the float values (involution)."""
    return bits32 ^ ((bits32 >> 31) & np.int32(0x7FFFFFFF))


def _key_float(key: int) -> np.float32:
    return _float_key(np.array([key], np.int32)).view(np.float32)[0]


def _float_keyed(v: np.float32) -> int:
    return int(_float_key(np.array([v], np.float32).view(np.int32))[0])


@lru_cache(maxsize=None)
def _thresholds(levels: tuple[float, ...]) -> tuple[mx.array, ...]:
    """Scalars ``T[j]`` (float32), ``j < n_levels - 1``: the first float32 at which level
    ``j + 1`` is strictly closer than level ``j`` (both distances rounded to float32).

    The predicate "``|t - C[j+1]| < |t - C[j]|``" is false at ``C[j]``, true at ``C[j+1]`` and
    monotone in between (rounding is monotone), so ``T[j]`` is found once, on the host, by
    bisection over the float32 values between the two levels. While ``|t| < 2**16`` levels
    further away are strictly farther after rounding too, so quant.cpp's linear scan (first
    strict minimum) returns ``#{j : t >= T[j]}``. No threshold is a zero (the distances at -0.0
    and +0.0 are equal), so the float compare and the order of the keys agree.
    """
    c = np.array(levels, np.float32)
    out = []
    for lo_level, hi_level in zip(c[:-1], c[1:]):
        lo, hi = _float_keyed(lo_level), _float_keyed(hi_level)  # predicate false, true
        while hi - lo > 1:
            mid = (lo + hi) // 2
            t = _key_float(mid)
            if abs(t - hi_level) < abs(t - lo_level):
                hi = mid
            else:
                lo = mid
        out.append(_f32(_key_float(hi)))
    return tuple(out)


_SMALL_COMPARE = 1 << 16  # elements of the [..., n_levels - 1] compare, at most


@lru_cache(maxsize=None)
def _threshold_array(levels: tuple[float, ...]) -> mx.array:
    """:func:`_thresholds` as one float32 array ``[n_levels - 1]``, made once."""
    return mx.array(np.array([np.array(t) for t in _thresholds(levels)], np.float32))


def _nearest_small(t: mx.array, levels: np.ndarray) -> mx.array:
    """:func:`nearest_centroid` for ``|t| < 2**16`` (always so in quantize: ``|t| <= ~CENT_MAX``).

    ``t float32 [...]`` -> ``uint8 [...]``: ``#{j : t >= T[j]}``. For a decode step's few
    values one ``[..., n_levels - 1]`` compare and a sum (3 primitives: a step pays per
    primitive); for larger arrays one whole-array compare per threshold (on MLX's CPU this beats
    a gather-based binary search and the ``[..., n_levels]`` compare, and it allocates nothing
    larger than ``t``). Both count exactly.
    """
    key = tuple(float(v) for v in levels)
    thresholds = _thresholds(key)
    if t.size * len(thresholds) <= _SMALL_COMPARE:
        return (t[..., None] >= _threshold_array(key)).sum(axis=-1).astype(mx.uint8)
    idx = (t >= thresholds[0]).astype(mx.uint8)
    for thr in thresholds[1:]:
        idx = idx + (t >= thr).astype(mx.uint8)
    return idx


def _check_levels(levels) -> np.ndarray:
    if isinstance(levels, mx.array):
        raise TypeError("levels must be a NumPy array or sequence (a host-side codebook such as "
                        "CENTROIDS[kind] or Q2_LEVELS), not an mx.array")
    levels = np.asarray(levels, np.float32)
    if levels.ndim != 1 or not 2 <= levels.size <= 128 or not np.all(np.diff(levels) > 0):
        raise ValueError("levels must be a strictly increasing 1-D codebook of 2..128 entries")
    return levels


def nearest_centroid(t: mx.array, levels) -> mx.array:
    """Index of the nearest level for each ``t``, as quant.cpp's linear scan picks it.

    ``t float32 [...]``, ``levels`` a sorted host codebook (``CENTROIDS[kind]``, ``Q2_LEVELS``)
    -> ``uint8 [...]``: the ``j`` minimising ``|t - C[j]|`` evaluated in float32, the lowest ``j``
    on a tie. Exact for every float32: the threshold count of :func:`_thresholds` where
    ``|t| < 2**16``, the full ``[..., n_levels]`` scan elsewhere (inf and NaN give 0, as the
    scan does).
    """
    if not isinstance(t, mx.array) or t.dtype != mx.float32:
        raise TypeError(f"nearest_centroid takes a float32 mx.array, got "
                        f"{t.dtype if isinstance(t, mx.array) else type(t).__name__}")
    levels = _check_levels(levels)
    n = levels.size
    dist = mx.abs(t[..., None] - mx.array(levels))  # [..., n]
    hit = dist == dist.min(axis=-1, keepdims=True)
    # the first j that reaches the minimum; none for NaN (the scan then keeps j = 0)
    first = n - mx.max(mx.where(hit, mx.arange(n, 0, -1), 0), axis=-1)
    scan = mx.where(first == n, 0, first).astype(mx.uint8)
    return mx.where(mx.abs(t) < _SAFE_ABS, _nearest_small(t, levels), scan)


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize, MLX operations (the CPU path)
# ---------------------------------------------------------------------------------------------

def _quantize_chunks(x: mx.array, kind: str) -> mx.array:
    """Chunks ``float32 [..., cd]`` (``cd <= 128``) -> blocks ``uint8 [..., block_bytes]``."""
    cd = x.shape[-1]
    ss = mx.cumsum(x * x, axis=-1)[..., -1]  # the sequential float32 sum of the C loop
    norm = mx.sqrt(ss)
    inv = mx.where(norm > _f32(_EPS), _f32(1) / norm, _f32(0))
    r = _rotate_fast(x * inv[..., None])  # rotate's bits in two primitives
    m = mx.abs(r).max(axis=-1)
    m = mx.where(m < _f32(_EPS), _f32(1), m)
    s = _f32(CENT_MAX[kind]) / m
    idx = _nearest_small(r * s[..., None], CENTROIDS[kind])
    packed = pack_indices(idx, bits(kind))
    parts = [_header_bytes(f16_trunc(norm), f16_trunc(s)), packed]
    pad = block_bytes(kind) - HEADER_BYTES - packed.shape[-1]
    if pad:
        parts.append(mx.zeros((*x.shape[:-1], pad), mx.uint8))
    return mx.concatenate(parts, axis=-1)


def _quantize_ops(x: mx.array, kind: str) -> mx.array:
    """``float32 [..., d]`` -> ``uint8 [..., n_chunks, bb]`` with MLX operations."""
    lead, d = x.shape[:-1], x.shape[-1]
    parts = [_quantize_chunks(x[..., lo:lo + k * cd].reshape(*lead, k, cd), kind)
             for lo, k, cd in _chunk_groups(d)]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-2)


def _dequantize_chunks(blocks: mx.array, kind: str, cd: int) -> mx.array:
    """Blocks ``uint8 [..., bb]`` -> chunks ``float32 [..., cd]``, exactly as quant.cpp decodes."""
    norm, s = _read_header(blocks, cd)
    step = _f32(1) / s
    idx = unpack_indices(blocks[..., HEADER_BYTES:], bits(kind), cd)
    y = mx.take(mx.array(CENTROIDS[kind]), idx)  # C[idx] * step, as lut[idx] in quant.cpp
    return inverse_rotate(y * step[..., None], cd) * norm[..., None]


def _dequantize_ops(blocks: mx.array, kind: str, d: int) -> mx.array:
    """``uint8 [..., n_chunks, bb]`` -> ``float32 [..., d]`` with MLX operations."""
    lead = blocks.shape[:-2]
    parts = []
    for lo, k, cd in _chunk_groups(d):
        c0 = lo // BLOCK
        parts.append(_dequantize_chunks(blocks[..., c0:c0 + k, :], kind, cd)
                     .reshape(*lead, k * cd))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize, GPU kernels (one thread per chunk, explicitly rounded operations)
# ---------------------------------------------------------------------------------------------

# The kernels' sources are files (quantref_mlx/kernels/turbo_kv_*.cu), one source for CUDA and
# Metal: turbo_kv_common.cuh spells each correctly rounded float32 operation for the backend.

# The thread's index, one chunk each. In the body itself: MLX adds Metal's attribute arguments
# (thread_position_in_grid, ...) to the signature only when the source names them.
_GID = {
    "cuda": "    const int gid = (int)(blockIdx.x * blockDim.x + threadIdx.x);\n",
    "metal": "    const int gid = (int)thread_position_in_grid.x;\n",
}
_THREADS = 128  # threads per block / threadgroup


def _backend() -> str:
    """``"cuda"`` or ``"metal"`` when the default device is a GPU that has one, else ``"cpu"``."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return "cpu"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return "cpu"


@lru_cache(maxsize=None)
def _kernel(backend: str, which: str, kind: str):
    """The ``mx.fast`` kernel object (compiled on first use, when a graph that uses it runs).

    The kind's CENT_MAX is compiled in (``TK_CMAX``), not passed as a one-element array: MLX's
    CUDA backend keeps arrays under 8 bytes in managed memory, and a kernel reading one waits
    for it to migrate (~20 us; see :func:`quantref_mlx.fused_decode._kernel`). The name carries
    a hash of the source: MLX caches compiled kernels by name.
    """
    # nine significant digits give the float32 back exactly, in CUDA and in Metal
    header = (f"#define TK_CMAX {float(np.float32(CENT_MAX[kind])):.9g}f\n"
              + kernels.source("turbo_kv_common.cuh"))
    source = _GID[backend] + kernels.source(f"turbo_kv_{which}.cu")
    inputs = ["x", "cent"] if which == "quantize" else ["blocks", "cent"]
    digest = hashlib.sha256((header + source).encode()).hexdigest()[:12]
    name = f"turbo_kv_{which}_{digest}"
    if backend == "cuda":
        return mx.fast.cuda_kernel(name=name, input_names=inputs, output_names=["out"],
                                   source=source, header=header)
    return mx.fast.metal_kernel(name=name, input_names=inputs, output_names=["out"],
                                source=source, header=header,
                                compile_options={"math_mode": "safe"})


@lru_cache(maxsize=None)
def _centroids(kind: str) -> mx.array:
    """The kind's centroids as one device array, made once (not a new upload per call)."""
    return mx.array(CENTROIDS[kind])


def _template(kind: str) -> list[tuple[str, int]]:
    return [("BB", block_bytes(kind)), ("BITS", bits(kind)), ("NLEV", 1 << bits(kind))]


def _launch(n_threads: int) -> dict:
    return {"grid": (max(n_threads, 1), 1, 1), "threadgroup": (_THREADS, 1, 1)}


def _quantize_kernel(x: mx.array, kind: str, backend: str) -> mx.array:
    """``float32 [..., d]`` -> ``uint8 [..., n_chunks, bb]`` with the GPU kernel."""
    lead, d = x.shape[:-1], x.shape[-1]
    nc, bb = _n_chunks(d), block_bytes(kind)
    rows = math.prod(lead)  # (np.prod costs microseconds a call: this runs every layer)
    if rows == 0:
        return mx.zeros((*lead, nc, bb), mx.uint8)
    (out,) = _kernel(backend, "quantize", kind)(
        inputs=[x.reshape(rows, d), _centroids(kind)],
        template=_template(kind), output_shapes=[(rows, nc, bb)],
        output_dtypes=[mx.uint8], **_launch(rows * nc))
    return out.reshape(*lead, nc, bb)


def _dequantize_kernel(blocks: mx.array, kind: str, d: int, backend: str) -> mx.array:
    """``uint8 [..., n_chunks, bb]`` -> ``float32 [..., d]`` with the GPU kernel."""
    lead, nc, bb = blocks.shape[:-2], blocks.shape[-2], blocks.shape[-1]
    rows = math.prod(lead)  # (np.prod costs microseconds a call: this runs every layer)
    if rows == 0:
        return mx.zeros((*lead, d), mx.float32)
    (out,) = _kernel(backend, "dequantize", kind)(
        inputs=[blocks.reshape(rows, nc, bb), _centroids(kind)],
        template=_template(kind) + [("D", d)], output_shapes=[(rows, d)],
        output_dtypes=[mx.float32], **_launch(rows * nc))
    return out.reshape(*lead, d)


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize (public)
# ---------------------------------------------------------------------------------------------

def quantize(x: mx.array, kind: str, *, check: bool = False) -> mx.array:
    """Keys ``float32 [..., d]`` -> blocks ``uint8 [..., ceil(d/128), block_bytes(kind)]``.

    Byte-identical to :func:`quantref.turbo_kv.quantize` (and quant.cpp). float16 / bfloat16
    are converted exactly, float64 is refused. Keys must be finite (not checked in the lazy
    graph; ``check=True`` evaluates ``x`` and raises ``ValueError`` naming the element).
    """
    _check_kind(kind)
    x = _as_float32(x, "x")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., d] with d >= 1, got shape {x.shape}")
    if check:
        _check_finite_now(x, "x")
    backend = _backend()
    if backend == "cpu":
        return _quantize_ops(x, kind)
    return _quantize_kernel(x, kind, backend)


def dequantize(blocks: mx.array, kind: str, d: int, *, check: bool = False) -> mx.array:
    """Blocks ``uint8 [..., n_chunks, block_bytes(kind)]`` -> keys ``float32 [..., d]``.

    Bit-identical to :func:`quantref.turbo_kv.dequantize`. The block contents (zero reserved
    bytes, zero bytes past element ``d``) are checked only with ``check=True``.
    """
    _check_kind(kind)
    d = _check_d(d)
    _check_blocks_shape(blocks, kind, d)
    if check:
        _check_blocks_now(blocks, kind, d)
    backend = _backend()
    if backend == "cpu":
        return _dequantize_ops(blocks, kind, d)
    return _dequantize_kernel(blocks, kind, d, backend)


# ---------------------------------------------------------------------------------------------
# Attention scores against compressed keys
# ---------------------------------------------------------------------------------------------

def _rotated_keys(blocks: mx.array, kind: str, d: int, path: str) -> mx.array:
    """Blocks ``[..., N, n_chunks, bb]`` -> float32 ``[..., N, d]`` keys in rotated space.

    Entry ``i`` of chunk ``c`` is ``C[idx_i] * (norm_c / s_c)`` (``fp32_codebook``) or
    ``T[idx_i] * (norm_c * (R / s_c))`` (``int8_codebook``): the path's formula in float32,
    three roundings per entry more than the oracle's float64 evaluation.
    """
    if path == "fp32_codebook":
        table, unit = mx.array(CENTROIDS[kind]), None
    else:
        table, unit = mx.array(INT8_TABLES[kind].astype(np.float32)), _f32(INT8_RECIP[kind])
    lead = blocks.shape[:-2]
    parts = []
    for lo, k, cd in _chunk_groups(d):
        c0 = lo // BLOCK
        chunk = blocks[..., c0:c0 + k, :]
        norm, s = _read_header(chunk, cd)
        factor = norm / s if unit is None else norm * (unit / s)
        idx = unpack_indices(chunk[..., HEADER_BYTES:], bits(kind), cd)
        parts.append((mx.take(table, idx) * factor[..., None]).reshape(*lead, k * cd))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


_F16_MIN_NORMAL = np.float16(2.0 ** -14)  # fp16 magnitudes below it have a zero exponent field


def _header_field(f16: mx.array) -> mx.array:
    """fp16 header fields (a float16 view of the block bytes) -> float32, subnormals flushed to
    a signed zero as :func:`f16_decode` does: the widening conversion is exact, and a subnormal
    times 0 keeps its sign (a NaN stays a NaN). The test is done on the float16 values, so that
    the converted value has one consumer only (``mx.compile`` fuses a node only when all of its
    consumers are fused). Unlike :func:`f16_decode`, no bit cast of a computed value: MLX does
    not fuse across one."""
    normal = mx.abs(f16) >= mx.array(_F16_MIN_NORMAL)  # false for subnormals, zeros (and NaN)
    return f16.astype(mx.float32) * normal  # x * 1 or x * 0 (a bool multiplies as 0 / 1)


def _fusion_barrier(x: mx.array) -> mx.array:
    """``x`` unchanged, through two reshapes: views that launch no kernel, but that
    ``mx.compile`` does not fuse across, so that an element-wise graph too deep or with too
    many inputs for one fused kernel (MLX: depth 11, 24 inputs) is split where it is cheapest,
    instead of wherever the limit falls."""
    return x.reshape(-1).reshape(x.shape)


def _index_words(blocks: mx.array, c: int, nb: int, groups: int) -> mx.array:
    """The packed indices of chunk ``c`` as one little-endian integer per 8 indices:
    ``uint32 / uint64 [..., N, groups, 1]`` (``nb`` bytes each). 4-bit indices are read as a
    uint32 view of the blocks (the 8-byte header keeps them 4-byte aligned); 3- and 5-bit ones
    are the OR of their bytes, a balanced tree of element-wise operations."""
    lead, n = blocks.shape[:-3], blocks.shape[-3]
    if nb == 4:
        at = HEADER_BYTES // 4
        words = mx.view(blocks, mx.uint32)[..., c:c + 1, at:at + groups]
        return words.reshape(*lead, n, groups, 1)
    dtype = mx.uint32 if nb * 8 <= 32 else mx.uint64
    packed = blocks[..., c:c + 1, HEADER_BYTES:HEADER_BYTES + groups * nb] \
        .reshape(*lead, n, groups, nb)
    terms = [packed[..., i:i + 1].astype(dtype) for i in range(nb)]
    terms = [t << mx.array(8 * i, dtype) if i else t for i, t in enumerate(terms)]
    while len(terms) > 1:
        terms = [terms[i] | terms[i + 1] if i + 1 < len(terms) else terms[i]
                 for i in range(0, len(terms), 2)]
    return terms[0]


def _symmetric_lookup(idx: mx.array, nb: int, upper: list[mx.array]) -> tuple[mx.array, mx.array]:
    """``table[idx]`` of a table symmetric about 0 (``table[j] == -table[2**nb - 1 - j]``, true of
    every centroid and int8 table) by element-wise selects, no gather: ``(upper_half, |value|)``
    with ``upper`` the table's upper half (``table[2**(nb-1):]``, increasing). For an index in the
    upper half the magnitude is ``upper[low bits]``, in the lower half ``upper[low bits ^ mask]``,
    so each level of the binary select tree tests whether bit ``j`` equals the top bit."""
    top = idx >> (nb - 1)
    level = upper
    for j in range(nb - 1):
        bit = (idx >> j) & 1 if j else idx & 1
        same = bit == top
        level = [mx.where(same, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return top == 1, level[0]


def _packed_lookup(idx: mx.array, nb: int, upper: np.ndarray) -> tuple[mx.array, mx.array]:
    """:func:`_symmetric_lookup` for a table of small integers (the int8 tables, ``nb`` <= 5):
    ``idx`` unsigned integers ``[...]`` (``nb``-bit indices) -> ``(upper_half bool [...],
    magnitude float32 [...])``. ``upper`` (the table's upper half, at most 16 integers in
    0..255) is packed a byte each into one or two 64-bit constants, and a magnitude read by a
    shift and a mask: the same float32 values (each an integer, so exact) from two constants
    instead of ``2**(nb-1)`` (``mx.compile`` stops fusing a kernel at 24 inputs, scalar
    constants included), and a shallower graph than the select tree."""
    half = len(upper)
    if half > 16 or not all(0 <= int(v) <= 255 for v in upper):
        raise AssertionError("a packed table holds at most 16 magnitudes in 0..255")  # int8's do
    words = [np.uint64(sum(int(v) << (8 * j) for j, v in enumerate(upper[w:w + 8])))
             for w in range(0, half, 8)]
    top = idx >> (nb - 1)
    low = half - 1
    # the magnitude's index: idx - half in the upper half, half - 1 - idx in the lower
    m = mx.where(top == 1, idx & low, low - (idx & low)).astype(mx.uint64)
    word = mx.array(words[0])
    if len(words) == 2:
        word = mx.where(m >= 8, mx.array(words[1]), word)
    byte = (word >> ((m & 7) << 3)) & mx.array(0xFF, mx.uint64)
    return top == 1, byte.astype(mx.float32)


def _rotate_fast(x: mx.array) -> mx.array:
    """:func:`rotate` of ``x float32 [..., cd]`` in two primitives: the sign flip (exact), then
    ``mx.hadamard_transform`` scaled by ``float32(1) / sqrtf(n2)``. MLX's CPU, CUDA and Metal
    kernels for it run the radix-2 butterfly stages in :func:`rotate`'s order (distances 1, 2,
    4, ...; ``u + v`` at the lower entry, ``u - v`` at the upper) in float32 and multiply by the
    scale last, so the result is :func:`rotate`'s bit for bit (tested against the oracle on the
    CPU; on an H200's CUDA backend too, ``n2`` = 2 ... 128, 2,000 vectors each)."""
    cd = x.shape[-1]
    n2 = _pow2_floor(cd)
    y = x[..., :n2] * _signs(n2)
    if n2 > 1 and y.size:  # (MLX refuses an empty transform)
        y = mx.hadamard_transform(y, scale=float(np.float32(1) / np.sqrt(np.float32(n2))))
    return y if n2 == cd else mx.concatenate([y, x[..., n2:]], axis=-1)


@lru_cache(maxsize=None)
def _codebook_scores(kind: str, d: int, path: str, compiled: bool = False,
                     cpu: bool = False):
    """``(q [..., M, d], blocks [..., N, n_chunks, bb]) -> scores [..., M, N]`` for the codebook
    paths, as one MLX function of few primitives (compiled: what the KV cache runs on its whole
    buffer, whose length changes every 256 tokens, not every token; :func:`scores` runs it
    uncompiled, for callers whose shapes change every call).

    Per 128-element chunk, on a GPU about one kernel per primitive:

    - the query rotated by :func:`_rotate_fast` (two primitives, :func:`rotate`'s bits);
    - the keys in rotated space, ``T[idx] * factor`` with ``factor = norm / s`` or
      ``norm * (R / s)``: element-wise operations only (byte views, shifts, masks, the int8
      table read from bytes packed in 64-bit constants or the float32 codebook by a select tree,
      the fp16 header decoded by a widening conversion), which ``mx.compile`` fuses into one
      kernel (4 bits; 3 bits with the float32 codebook), two (3 and 5 bits with the int8 table)
      or three (5 bits with the float32 codebook), as counted on MLX 0.32.4
      (``tests/test_mlx_turbo_kv.py``): 5-bit indices are assembled from bytes in a 64-bit
      word, a deeper graph than MLX fuses into one kernel (depth 11), and 3 bits with the int8
      table leave one conversion in a kernel of its own (the select tree did too);
    - one matmul.

    The arithmetic is the one :func:`_rotated_keys` and :func:`_rotate_chunks` describe, so the
    scores are the same bits as theirs, and compiling changes none: no multiply is followed by an
    add (the sign flip's and the table sign's products are exact).

    ``cpu``: the header's factor in a kernel of its own (one value a block), not fused into the
    keys' kernel, where a CPU evaluates it once for each of the block's entries (a GPU's threads
    do so for free; on the CPU the keys took ~3x longer: one more kernel is cheaper there). The
    same operations, the same bits.
    """
    if path == "fp32_codebook":
        table, unit = CENTROIDS[kind].astype(np.float32), None
    else:
        table, unit = INT8_TABLES[kind].astype(np.float32), _f32(INT8_RECIP[kind])
    nb = bits(kind)
    half = 1 << (nb - 1)
    if not np.array_equal(table[:half], -table[half:][::-1]):
        raise AssertionError(f"{kind}'s {path} table is not symmetric")  # the format's, always
    upper = [_f32(v) for v in table[half:]]
    word = mx.uint32 if nb <= 4 else mx.uint64
    shifts = mx.array((np.arange(8) * nb).astype(np.uint32 if nb <= 4 else np.uint64))
    mask = mx.array((1 << nb) - 1, word)
    chunks = [(lo, min(BLOCK, d - lo)) for lo in range(0, d, BLOCK)]

    def fn(q: mx.array, blocks: mx.array) -> mx.array:
        lead, n = blocks.shape[:-3], blocks.shape[-3]
        f16 = mx.view(blocks, mx.float16)  # [..., N, n_chunks, bb / 2]: the header's fields
        out = None
        for c, (lo, cd) in enumerate(chunks):
            qr = _rotate_fast(q[..., lo:lo + cd])
            norm = _header_field(f16[..., c:c + 1, 0:1])  # [..., N, 1, 1]
            s = _header_field(f16[..., c:c + 1, 2:3])
            # s < 1e-10 is never made by quantize; decoded as quant.cpp does all the same
            s = mx.where(s < _f32(_EPS), _f32(np.sqrt(np.float32(cd))), s)
            factor = norm / s if unit is None else norm * (unit / s)
            if cpu:
                factor = _fusion_barrier(factor)
            groups = -(-cd // 8)
            idx = (_index_words(blocks, c, nb, groups) >> shifts) & mask  # [..., N, groups, 8]
            if nb > 4:  # a 64-bit word: the lookup on bytes, in a kernel of its own
                idx = _fusion_barrier(idx.astype(mx.uint8))
            # +-T[idx] or +-factor exactly, then one rounding: T[idx] * factor. Which form
            # fuses into fewer kernels depends on the path and the kind (MLX fuses a node with
            # two consumers, here factor, at the deeper one's depth, and stops at 24 inputs,
            # each scalar constant one): measured with bench/decode_prims.py and counted by
            # tests/test_mlx_turbo_kv.py.
            if unit is not None:  # the int8 table: the sign on the integer, the factor last
                upper_half, magnitude = _packed_lookup(idx, nb, INT8_TABLES[kind][half:])
                keys = (magnitude * mx.where(upper_half, _f32(1), _f32(-1))) * factor
            elif nb == 4:
                upper_half, magnitude = _symmetric_lookup(idx, nb, upper)
                keys = magnitude * (factor * mx.where(upper_half, _f32(1), _f32(-1)))
            else:
                upper_half, magnitude = _symmetric_lookup(idx, nb, upper)
                keys = magnitude * mx.where(upper_half, factor, -factor)
            keys = keys.reshape(*lead, n, groups * 8)
            if groups * 8 != cd:
                keys = keys[..., :cd]
            part = mx.matmul(qr, mx.swapaxes(keys, -1, -2))
            out = part if out is None else out + part
        return out

    return mx.compile(fn) if compiled else fn


def scores(q: mx.array, blocks: mx.array, kind: str, d: int, path: str = "int8_codebook",
           *, check: bool = False) -> mx.array:
    """``q . k`` of queries against compressed keys, as quant.cpp's chosen path reads them.

    ``q float32 [..., M, d]``, ``blocks uint8 [..., N, n_chunks, block_bytes]`` (leading batch
    axes broadcast, e.g. ``n_kv_heads``) -> ``float32 [..., M, N]``, not scaled by
    ``1/sqrt(d)``. Paths (``PATHS``) as in :func:`quantref.turbo_kv.scores`: ``dequant`` is
    ``q @ dequantize(blocks).T``; the codebook paths rotate ``q`` chunk by chunk and take one
    matmul with the keys decoded to rotated space. Every block is decoded once; there is no loop
    over keys. float32 throughout, so within ``(d + 8) * 2**-24 * (|q| @ |k|.T)`` of the oracle
    (on a GPU only with ``MLX_ENABLE_TF32=0``: see the module docstring). ``check=True``
    evaluates and checks ``q`` (finite) and the block contents.
    """
    _check_kind(kind)
    if path not in PATHS:
        raise ValueError(f"unknown scores path {path!r}; one of {PATHS}")
    d = _check_d(d)
    q = _as_float32(q, "q")
    if q.ndim < 2 or q.shape[-1] != d:
        raise ValueError(f"q must be [..., M, d={d}], got shape {q.shape}")
    _check_blocks_shape(blocks, kind, d, min_ndim=3)
    try:
        np.broadcast_shapes(q.shape[:-2], blocks.shape[:-3])
    except ValueError:
        raise ValueError(f"batch axes of q {q.shape[:-2]} and blocks {blocks.shape[:-3]} do not "
                         f"broadcast") from None
    if check:
        _check_blocks_now(blocks, kind, d)
        _check_finite_now(q, "q")
    if path == "dequant":
        keys = dequantize(blocks, kind, d)
        return mx.matmul(q, mx.swapaxes(keys, -1, -2))
    return _codebook_scores(kind, d, path)(q, blocks)


# ---------------------------------------------------------------------------------------------
# Value formats for a turbo K cache (quant.cpp never turbo-quantizes values)
# ---------------------------------------------------------------------------------------------

def _round_half_away(v: mx.array) -> mx.array:
    """C's ``roundf`` of float32 ``v`` (half away from zero), exact for every float32.

    ``|v| + (0.5 - 2**-25)`` rounds up to the next integer exactly when the fraction of ``|v|``
    is at least one half (at ``k + 1/2`` the sum is a tie that goes to the even ``k + 1``).
    """
    return mx.trunc(v + mx.where(v < 0, _f32(-_JUST_BELOW_HALF), _f32(_JUST_BELOW_HALF)))


def quantize_v(x: mx.array, v_type: str, *, check: bool = False) -> mx.array:
    """Values ``float32 [..., d]`` -> ``uint8 [..., v_bytes(v_type, d)]``, the oracle's bytes.

    ``fp16``: IEEE round-to-nearest-even halves; ``fp32``: the floats; ``q4`` / ``q2``: per
    group of 32 values a little-endian float32 scale ``dq`` then the packed codes (see
    :func:`quantref.turbo_kv.quantize_v`). Finiteness is checked only with ``check=True``.
    """
    _check_v_type(v_type)
    x = _as_float32(x, "x")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., d] with d >= 1, got shape {x.shape}")
    if check:
        _check_finite_now(x, "x")
    lead, d = x.shape[:-1], x.shape[-1]
    if v_type == "fp16":
        return mx.view(x.astype(mx.float16), mx.uint8).reshape(*lead, 2 * d)
    if v_type == "fp32":
        return mx.view(x, mx.uint8).reshape(*lead, 4 * d)
    n_groups = -(-d // V_GROUP)
    if n_groups * V_GROUP > d:  # zero padding leaves absmax unchanged
        x = mx.concatenate([x, mx.zeros((*lead, n_groups * V_GROUP - d), mx.float32)], axis=-1)
    groups = x.reshape(*lead, n_groups, V_GROUP)
    dq = mx.abs(groups).max(axis=-1) / _f32(_Q4_MAX if v_type == "q4" else Q2_LEVELS[-1])
    inv = mx.where(dq > _f32(_EPS), _f32(1) / dq, _f32(0))
    v = groups * inv[..., None]
    if v_type == "q4":
        codes = mx.clip(_round_half_away(v) + 8, 0, 15).astype(mx.uint8)
    else:
        codes = _nearest_small(v, Q2_LEVELS)  # |v| <= ~1.5104
    if n_groups * V_GROUP > d:  # elements past d are not stored: their bits stay 0
        keep = mx.array(np.arange(n_groups * V_GROUP).reshape(n_groups, V_GROUP) < d)
        codes = mx.where(keep, codes, mx.array(0, mx.uint8))
    packed = pack_indices(codes, 4 if v_type == "q4" else 2)  # [..., n_groups, 16 or 8]
    out = mx.concatenate([mx.view(dq[..., None], mx.uint8), packed], axis=-1)
    return out.reshape(*lead, n_groups * (4 + _V_PACKED[v_type]))


def dequantize_v(data: mx.array, v_type: str, d: int) -> mx.array:
    """``uint8 [..., v_bytes(v_type, d)]`` -> values ``float32 [..., d]``, bit-identical.

    q4: ``(q - 8) * dq``; q2: ``Q2_LEVELS[q] * dq`` (float32, one rounding), as quant.cpp.
    """
    _check_v_type(v_type)
    d = _check_d(d)
    _check_uint8(data, "data")
    nb = v_bytes(v_type, d)
    if data.ndim == 0 or data.shape[-1] != nb:
        raise ValueError(f"{v_type} values of d={d} take {nb} bytes; got data of shape "
                         f"{data.shape}")
    lead = data.shape[:-1]
    if v_type == "fp16":
        return mx.view(data, mx.float16).astype(mx.float32)
    if v_type == "fp32":
        return mx.view(data, mx.float32)
    n_groups = -(-d // V_GROUP)
    grouped = data.reshape(*lead, n_groups, 4 + _V_PACKED[v_type])
    dq = mx.view(grouped[..., :4], mx.float32)  # [..., n_groups, 1]
    codes = unpack_indices(grouped[..., 4:], 4 if v_type == "q4" else 2, V_GROUP)
    if v_type == "q4":
        levels = codes.astype(mx.float32) - _f32(8)
    else:
        levels = mx.take(mx.array(Q2_LEVELS), codes)
    return (levels * dq).reshape(*lead, n_groups * V_GROUP)[..., :d]
