"""The turbo_kv oracle: quant.cpp's ``turbo_kv_3b/4b/5b`` key-cache blocks, byte for byte.

quant.cpp compresses each post-RoPE key chunk of at most 128 elements into one block: the L2 norm
and a scale as *truncating* fp16, then the unit vector, rotated by a sign flip + Walsh-Hadamard
butterfly, snapped to a 8/16/32-level codebook and bit-packed. This module reproduces that
process exactly (the contract is ``shared/docs/turbo_kv_format.md``; the golden vectors made by
the C code are matched bit for bit), and reads blocks back the three ways quant.cpp does:
``dequant`` (decode, then a dot product), ``fp32_codebook`` and ``int8_codebook`` (the query is
rotated once and dotted with the codebook values in rotated space).

It also holds the value formats that go with a turbo K cache (``fp16``, ``fp32``, ``q4``, ``q2``).

Every step that the format fixes is float32 with one rounding per operation in the C order
(the butterfly, the norm as a sequential sum, the codebook search). Dot products, whose
summation order the format leaves free, are float32 matrix products (as fast as the fp32 cache's).
``docs/oracle.md`` is the guide for kernel authors.
"""

from __future__ import annotations


from functools import lru_cache

import numpy as np

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
    "as_blocks",
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

# ---------------------------------------------------------------------------------------------
# Constants of the format
# ---------------------------------------------------------------------------------------------

BLOCK = 128  # elements per block; a longer head is split into consecutive 128-element chunks
HEADER_BYTES = 8  # norm (fp16), 0, inv_std (fp16), 0
KINDS = ("turbo_kv_3b", "turbo_kv_4b", "turbo_kv_5b")
PATHS = ("int8_codebook", "fp32_codebook", "dequant")

_BITS = {"turbo_kv_3b": 3, "turbo_kv_4b": 4, "turbo_kv_5b": 5}


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


# The float32 literals of quant.cpp's codebooks (3b and 4b: Gaussian Lloyd-Max levels; 5b is
# its own table). Index 0 is the most negative level.
CENTROIDS: dict[str, np.ndarray] = {
    "turbo_kv_3b": _frozen(np.array(
        [-2.1520, -1.3440, -0.7560, -0.2451, 0.2451, 0.7560, 1.3440, 2.1520], np.float32)),
    "turbo_kv_4b": _frozen(np.array(
        [-2.7326, -2.0690, -1.6180, -1.2562, -0.9423, -0.6568, -0.3881, -0.1284,
         0.1284, 0.3881, 0.6568, 0.9423, 1.2562, 1.6180, 2.0690, 2.7326], np.float32)),
    "turbo_kv_5b": _frozen(np.array(
        [-1.9956, -1.7900, -1.6107, -1.4493, -1.3010, -1.1631, -1.0334, -0.9104,
         -0.7928, -0.6795, -0.5697, -0.4626, -0.3576, -0.2543, -0.1520, -0.0506,
         0.0506, 0.1520, 0.2543, 0.3576, 0.4626, 0.5697, 0.6795, 0.7928,
         0.9104, 1.0334, 1.1631, 1.3010, 1.4493, 1.6107, 1.7900, 1.9956], np.float32)),
}

# The outermost level: quantize scales the rotated unit vector so that its max |r| lands on it.
CENT_MAX: dict[str, np.float32] = {
    "turbo_kv_3b": np.float32(2.1520),
    "turbo_kv_4b": np.float32(2.7326),
    "turbo_kv_5b": np.float32(1.9956),
}

# The int8 codebooks of quant.cpp's SIMD attention: T[j] = round_half_away(C[j] * (127 /
# CENT_MAX)) clamped to +-127 (tests/test_turbo_kv.py recomputes them from that rule).
INT8_TABLES: dict[str, np.ndarray] = {
    "turbo_kv_3b": _frozen(np.array([-127, -79, -45, -14, 14, 45, 79, 127], np.int8)),
    "turbo_kv_4b": _frozen(np.array(
        [-127, -96, -75, -58, -44, -31, -18, -6, 6, 18, 31, 44, 58, 75, 96, 127], np.int8)),
    "turbo_kv_5b": _frozen(np.array(
        [-127, -114, -103, -92, -83, -74, -66, -58, -50, -43, -36, -29, -23, -16, -10, -3,
         3, 10, 16, 23, 29, 36, 43, 50, 58, 66, 74, 83, 92, 103, 114, 127], np.int8)),
}

# R = CENT_MAX / 127 in float32: the value one int8 step stands for (before the 1/s scale).
INT8_RECIP: dict[str, np.float32] = {k: np.float32(v / np.float32(127)) for k, v in CENT_MAX.items()}

_ONE = np.float32(1.0)
_EPS = np.float32(1e-10)  # quant.cpp's 1e-10f guards (norm, max |r|, decoded scale)


def _check_kind(kind: str) -> None:
    if kind not in _BITS:
        raise ValueError(f"unknown turbo_kv kind {kind!r}; one of {KINDS}")


def bits(kind: str) -> int:
    """Bits per codebook index: 3, 4 or 5."""
    _check_kind(kind)
    return _BITS[kind]


def block_bytes(kind: str) -> int:
    """Bytes of one block: the 8-byte header + 128 packed indices (56 / 72 / 88)."""
    return HEADER_BYTES + BLOCK * bits(kind) // 8


def block_dtype(kind: str) -> np.dtype:
    """The block as a NumPy structured dtype (little-endian, no padding).

    Fields: ``norm`` and ``inv_std`` (uint16 truncating-fp16 bit patterns; read them with
    :func:`f16_decode`), ``reserved0`` / ``reserved1`` (always 0) and ``indices`` (the packed
    bytes).
    """
    return np.dtype([("norm", "<u2"), ("reserved0", "<u2"), ("inv_std", "<u2"),
                     ("reserved1", "<u2"), ("indices", "u1", (BLOCK * bits(kind) // 8,))])


def as_blocks(blocks: np.ndarray, kind: str) -> np.ndarray:
    """``uint8 [..., block_bytes]`` -> a structured view ``[...]`` of :func:`block_dtype` records.

    E.g. ``f16_decode(as_blocks(quantize(x, kind), kind)["norm"])`` are the stored norms,
    float32 ``[..., n_chunks]``.
    """
    _check_uint8(blocks, "blocks")
    bb = block_bytes(kind)
    if blocks.ndim < 1 or blocks.shape[-1] != bb:
        raise ValueError(f"{kind} blocks have {bb} bytes; got last axis {blocks.shape[-1:]} "
                         f"in blocks of shape {blocks.shape}")
    return np.ascontiguousarray(blocks).view(block_dtype(kind))[..., 0]


def _n_chunks(d: int) -> int:
    return -(-d // BLOCK)


def _chunks(d: int) -> list[tuple[int, int]]:
    """The ``(start, stop)`` element ranges of a head of ``d`` elements, one per block."""
    return [(lo, min(d, lo + BLOCK)) for lo in range(0, d, BLOCK)]


def _pow2_floor(n: int) -> int:
    """The largest power of two <= n (the rotated prefix of an n-element chunk)."""
    return 1 << (n.bit_length() - 1)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------

def _as_float32(x, name: str) -> np.ndarray:
    """float32 (or exactly convertible float16) arrays pass; float64 and the rest are refused.

    float64 is refused rather than rounded: quant.cpp quantizes float32 keys, and which float32
    a float64 becomes is the caller's choice to make visibly (``x.astype(np.float32)``).
    """
    x = np.asarray(x)
    if x.dtype.kind == "f" and x.dtype.itemsize in (2, 4):
        return x.astype(np.float32, copy=False)
    if x.dtype.kind == "f":
        raise TypeError(f"{name} is {x.dtype}; turbo_kv works on float32 as quant.cpp does: "
                        f"convert it explicitly ({name}.astype(np.float32))")
    raise TypeError(f"{name} must be a float32 (or float16) array, got dtype {x.dtype}")


def _check_uint8(a, name: str) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8:
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise TypeError(f"{name} must be a uint8 array of blocks, got {got}")


def _check_finite(a: np.ndarray, name: str) -> None:
    finite = np.isfinite(a)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(f"{name}[{', '.join(map(str, where))}] is {a[where]}: "
                         f"turbo_kv needs finite input")


def _check_d(d) -> int:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
        raise TypeError(f"d must be an int, got {type(d).__name__}")
    if d <= 0:
        raise ValueError(f"d must be positive, got {d}")
    return int(d)


def _check_blocks(blocks, kind: str, d: int) -> np.ndarray:
    """Validate ``blocks uint8 [..., n_chunks, block_bytes]`` for vectors of ``d`` elements.

    Besides the shape, the bytes the format fixes to zero must be zero: the two reserved header
    fields, and the index bytes past element ``d`` of a short last chunk (so blocks quantized
    for a longer ``d`` are caught instead of silently decoded short).
    """
    _check_uint8(blocks, "blocks")
    bb = block_bytes(kind)
    nc = _n_chunks(d)
    if blocks.ndim < 2:
        raise ValueError(f"blocks must be [..., n_chunks, {bb}], got shape {blocks.shape}")
    if blocks.shape[-1] != bb:
        raise ValueError(f"{kind} blocks have {bb} bytes; got last axis {blocks.shape[-1]} "
                         f"(blocks of shape {blocks.shape})")
    if blocks.shape[-2] != nc:
        raise ValueError(f"d={d} needs {nc} block(s) per vector (128 elements each) but blocks "
                         f"of shape {blocks.shape} have {blocks.shape[-2]}: d is inconsistent "
                         f"with the blocks")
    reserved = blocks[..., [2, 3, 6, 7]]
    if reserved.any():
        where = tuple(int(i) for i in np.argwhere(reserved.any(axis=-1))[0])
        raise ValueError(f"blocks[{', '.join(map(str, where))}] has non-zero reserved header "
                         f"bytes (2-3, 6-7): not a {kind} block")
    tail_d = d - (nc - 1) * BLOCK
    used = HEADER_BYTES + -(-tail_d * _BITS[kind] // 8)
    if used < bb:
        tail = blocks[..., nc - 1, used:]
        if tail.any():
            where = tuple(int(i) for i in np.argwhere(tail.any(axis=-1))[0])
            raise ValueError(f"blocks[{', '.join(map(str, where + (nc - 1,)))}] has non-zero "
                             f"index bytes past element {tail_d} (byte {used} on): d={d} is "
                             f"inconsistent with the blocks (quantized with a larger d?)")
    return blocks


# ---------------------------------------------------------------------------------------------
# Truncating fp16 (the block header)
# ---------------------------------------------------------------------------------------------

def f16_trunc(x) -> np.ndarray:
    """float32 -> fp16 bit patterns (uint16), quant.cpp's header conversion.

    The low 13 mantissa bits are dropped (rounding toward zero), an exponent below fp16's normal
    range gives a signed zero (no subnormals), one above it a signed infinity (NaN too).
    """
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"f16_trunc takes float32, got {x.dtype}")
    u = x.view(np.uint32)
    sign = (u >> 16) & 0x8000
    e = ((u >> 23) & 0xFF).astype(np.int32) - 127 + 15
    mant = (u >> 13) & 0x3FF
    normal = sign | (np.clip(e, 0, 31).astype(np.uint32) << 10) | mant
    h = np.where(e <= 0, sign, np.where(e >= 31, sign | 0x7C00, normal))
    return h.astype(np.uint16)[()]


def f16_decode(h) -> np.ndarray:
    """fp16 bit patterns (uint16) -> float32, flushing subnormals to (signed) zero."""
    h = np.asarray(h)
    if h.dtype != np.uint16:
        raise TypeError(f"f16_decode takes uint16 bit patterns, got {h.dtype}")
    u = h.astype(np.uint32)
    sign = (u & 0x8000) << 16
    e = (u >> 10) & 0x1F
    mant = u & 0x3FF
    bits32 = np.where(e == 0, sign,
                      np.where(e == 31, sign | 0x7F800000 | (mant << 13),
                               sign | ((e + (127 - 15)) << 23) | (mant << 13)))
    return bits32.astype(np.uint32).view(np.float32)[()]


# ---------------------------------------------------------------------------------------------
# The rotation: sign flip + Walsh-Hadamard butterfly + 1/sqrt(n2), float32, in the C order
# ---------------------------------------------------------------------------------------------

def _butterfly(y: np.ndarray) -> np.ndarray:
    """Unnormalised Walsh-Hadamard butterfly (Sylvester order) over the last axis.

    ``y float32 [..., n]`` with ``n`` a power of two -> a new ``float32 [..., n]``. Stage
    ``len = 1, 2, 4, ...`` maps each pair ``(x[g+j], x[g+j+len])`` to ``(u + v, u - v)``: viewed
    as ``[..., n / 2len, 2, len]`` that is one add and one subtract per stage, each rounded once.
    """
    n = y.shape[-1]
    lead = y.shape[:-1]
    bufs = (np.empty_like(y), np.empty_like(y))
    length, k = 1, 0
    while length < n:
        pairs = y.reshape(*lead, n // (2 * length), 2, length)
        out = bufs[k].reshape(pairs.shape)
        np.add(pairs[..., 0, :], pairs[..., 1, :], out=out[..., 0, :])
        np.subtract(pairs[..., 0, :], pairs[..., 1, :], out=out[..., 1, :])
        y, length, k = bufs[k], 2 * length, 1 - k
    return y if n > 1 else y.copy()


def _rotation_scale(n2: int) -> np.float32:
    return _ONE / np.sqrt(np.float32(n2))  # float32(1) / sqrtf(n2)


def _rotation_args(x, d, name: str) -> tuple[np.ndarray, int]:
    x = _as_float32(x, name)
    if x.ndim == 0:
        raise ValueError(f"{name} must have a vector axis, got a scalar")
    d = x.shape[-1] if d is None else _check_d(d)
    if d > x.shape[-1]:
        raise ValueError(f"d={d} is longer than {name}'s last axis ({x.shape[-1]})")
    return x, _pow2_floor(d)


def rotate(x, d: int | None = None) -> np.ndarray:
    """quant.cpp's forward rotation of vectors of ``d`` elements (default: the last axis).

    ``x float32 [..., L]`` (``L >= d``) -> ``float32 [..., L]``. With ``n2`` the largest power of
    two ``<= d``, entries ``i < n2`` are (1) negated for even ``i``, (2) put through the
    butterfly, (3) multiplied by ``float32(1) / sqrtf(n2)``; entries from ``n2`` on pass through.
    """
    x, n2 = _rotation_args(x, d, "x")
    out = x.copy()
    head = out[..., :n2].copy()
    np.negative(head[..., 0::2], out=head[..., 0::2])
    out[..., :n2] = _butterfly(head) * _rotation_scale(n2)
    return out


def inverse_rotate(x, d: int | None = None) -> np.ndarray:
    """The inverse of :func:`rotate`, as quant.cpp orders it: scale first, butterfly, signs.

    ``x float32 [..., L]`` (``L >= d``) -> ``float32 [..., L]``; entries from ``n2`` on pass
    through.
    """
    x, n2 = _rotation_args(x, d, "x")
    out = x.copy()
    head = _butterfly(out[..., :n2] * _rotation_scale(n2))
    np.negative(head[..., 0::2], out=head[..., 0::2])
    out[..., :n2] = head
    return out


# ---------------------------------------------------------------------------------------------
# Bit packing: one little-endian bit stream, LSB first
# ---------------------------------------------------------------------------------------------

def _check_bits(nbits) -> int:
    if isinstance(nbits, bool) or not isinstance(nbits, (int, np.integer)) \
            or not 1 <= nbits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {nbits!r}")
    return int(nbits)


def pack_indices(idx, bits: int) -> np.ndarray:
    """Pack indices ``uint8 [..., n]`` (each ``< 2**bits``) -> ``uint8 [..., ceil(n*bits/8)]``.

    Index ``i`` occupies stream bits ``[bits*i, bits*i + bits)``; stream bit ``k`` is bit
    ``k % 8`` of byte ``k // 8``; bits past the last index are 0. (For 4 bits this is "even
    index in the low nibble".) Eight indices fill exactly ``bits`` bytes, so groups of eight
    are assembled as one little-endian uint64 and cut to ``bits`` bytes.
    """
    nb = _check_bits(bits)
    idx = np.asarray(idx)
    if idx.dtype.kind not in "ui":
        raise TypeError(f"indices must be an integer array, got {idx.dtype}")
    if idx.ndim == 0:
        raise ValueError("indices must have an element axis, got a scalar")
    if idx.size and (idx.min() < 0 or idx.max() >= (1 << nb)):
        raise ValueError(f"indices must be in 0..{(1 << nb) - 1} for {nb} bits, "
                         f"got values in {idx.min()}..{idx.max()}")
    lead, n = idx.shape[:-1], idx.shape[-1]
    groups, n_bytes = -(-n // 8), -(-n * nb // 8)
    padded = np.zeros((*lead, groups, 8), np.uint64)
    padded.reshape(*lead, groups * 8)[..., :n] = idx
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(nb)
    words = np.bitwise_or.reduce(padded << shifts, axis=-1)  # [..., groups]
    stream = words.astype("<u8").view(np.uint8).reshape(*lead, groups, 8)[..., :nb]
    return np.ascontiguousarray(stream.reshape(*lead, groups * nb)[..., :n_bytes])


def unpack_indices(packed, bits: int, n: int) -> np.ndarray:
    """The first ``n`` indices of bit streams ``uint8 [..., n_bytes]`` -> ``uint8 [..., n]``."""
    nb = _check_bits(bits)
    _check_uint8(packed, "packed")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    need = -(-n * nb // 8)
    if packed.ndim == 0 or packed.shape[-1] < need:
        raise ValueError(f"{n} indices of {nb} bits need {need} bytes, got packed of shape "
                         f"{packed.shape}")
    lead = packed.shape[:-1]
    if nb == 4:  # the common case, two nibbles a byte: low nibble first
        idx = np.empty((*lead, 2 * need), np.uint8)
        np.bitwise_and(packed[..., :need], 0x0F, out=idx[..., 0::2])
        np.right_shift(packed[..., :need], 4, out=idx[..., 1::2])
        return idx[..., :n]
    groups = -(-n // 8)
    stream = np.zeros((*lead, groups * nb), np.uint8)  # whole groups of eight indices
    take = min(packed.shape[-1], groups * nb)
    stream[..., :take] = packed[..., :take]
    raw = np.zeros((*lead, groups, 8), np.uint8)
    raw[..., :nb] = stream.reshape(*lead, groups, nb)
    words = raw.view("<u8")  # [..., groups, 1]: eight indices per little-endian word
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(nb)
    idx = (words >> shifts) & np.uint64((1 << nb) - 1)  # [..., groups, 8]
    return idx.astype(np.uint8).reshape(*lead, groups * 8)[..., :n]


# ---------------------------------------------------------------------------------------------
# The codebook search: first strict minimum of |t - C[j]| in float32, via exact thresholds
# ---------------------------------------------------------------------------------------------

def _float_key(bits32: np.ndarray) -> np.ndarray:
    """float32 bit patterns (int32) -> int32 keys in the order of the float values.

    Non-negative floats keep their bits; negative ones flip all but the sign bit, so that a
    larger magnitude gives a smaller key (-0.0 lands just below +0.0; the two compare alike in
    the search because the thresholds are found over keys too). The map is its own inverse.
    """
    return bits32 ^ ((bits32 >> 31) & np.int32(0x7FFFFFFF))


def _key_to_float(key: int) -> np.float32:
    k = np.array([key], np.int32)
    return _float_key(k).view(np.float32)[0]


def _float_to_key(v: np.float32) -> int:
    return int(_float_key(np.array([v], np.float32).view(np.int32))[0])


_SAFE_ABS = 2.0 ** 16  # below this, ulp(|t| + 3) is far under any level gap (>= 0.1)


@lru_cache(maxsize=None)
def _search_table(levels: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-bucket tables that turn the codebook search into two lookups and a compare.

    For adjacent levels ``C[j] < C[j+1]`` the float32 predicate "``|t - C[j+1]| < |t - C[j]|``"
    is false at ``C[j]``, true at ``C[j+1]`` and monotone in between (rounding is monotone).
    While ``|t| < 2**16`` a float32 ulp of any distance is far smaller than the level gaps, so
    levels further away are strictly farther after rounding too, and the first strict minimum
    is ``#{j : t >= T[j]}`` with ``T[j]`` the first float32 where the predicate holds, found
    once by bisection over the float32 values.

    The keys (:func:`_float_key`) are cut into 65536 buckets of 65536 consecutive float32 values
    each (their top 16 bits); each bucket holds at most one threshold (checked), so
    ``index = base[bucket] + (key >= thr[bucket])`` exactly. Buckets reaching ``|t| >= 2**16``
    (and inf / NaN) get the marker ``base = 255``: there rounding can tie levels that are not
    neighbours (at ``t = 1e30`` every distance rounds to 1e30 and the scan keeps index 0), and
    :func:`nearest_centroid` falls back to the plain scan for them.
    """
    c = np.array(levels, np.float32)
    thresholds = []
    for lo_level, hi_level in zip(c[:-1], c[1:]):
        lo, hi = _float_to_key(lo_level), _float_to_key(hi_level)  # predicate: false, true
        while hi - lo > 1:
            mid = (lo + hi) // 2
            t = _key_to_float(mid)
            if abs(t - hi_level) < abs(t - lo_level):
                hi = mid
            else:
                lo = mid
        thresholds.append(hi)
    t_keys = np.array(thresholds, np.int64)
    bucket_of = (t_keys >> 16) + 32768
    if len(np.unique(bucket_of)) != len(bucket_of):
        raise AssertionError(f"two codebook thresholds share a search bucket: {levels}")
    starts = (np.arange(65536, dtype=np.int64) - 32768) << 16
    base = np.searchsorted(t_keys, starts, side="left").astype(np.uint8)  # thresholds below
    thr = np.full(65536, np.iinfo(np.int32).max, np.int32)  # no finite float reaches this key
    thr[bucket_of] = t_keys
    # the floats at both ends of each bucket (values are monotone within a bucket)
    ends = np.stack([starts, starts + 0xFFFF]).astype(np.int32)
    with np.errstate(invalid="ignore"):
        reach = np.abs(_float_key(ends).view(np.float32)).max(axis=0)
    unsafe = ~(reach < _SAFE_ABS)  # NaN patterns included
    base[unsafe] = _UNSAFE
    thr[unsafe] = np.iinfo(np.int32).max
    return _frozen(base), _frozen(thr)


_UNSAFE = 255  # base[] marker of the buckets that take the plain scan


def nearest_centroid(t, levels) -> np.ndarray:
    """Index of the nearest level for each ``t``, as quant.cpp's linear scan picks it.

    ``t float32 [...]``, ``levels`` a sorted float32 codebook (``CENTROIDS[kind]``,
    ``Q2_LEVELS``) -> ``uint8 [...]``: the ``j`` minimising ``|t - C[j]|`` evaluated in float32,
    the lowest ``j`` on a tie (the scan keeps the first strict minimum). Exact for every
    float32; without an ``[..., n_levels]`` argmin for ``|t| < 2**16`` (see
    :func:`_search_table`), with one for the rare rest.
    """
    t = np.asarray(t)
    if t.dtype != np.float32:
        raise TypeError(f"nearest_centroid takes float32, got {t.dtype}")
    levels = np.asarray(levels, np.float32)
    if levels.ndim != 1 or not 2 <= levels.size <= 128 or not np.all(np.diff(levels) > 0):
        raise ValueError("levels must be a strictly increasing 1-D codebook of 2..128 entries")
    base, thr = _search_table(tuple(levels.tolist()))
    key = _float_key(np.ascontiguousarray(t).view(np.int32))
    bucket = (key >> 16) + 32768
    idx = np.take(base, bucket) + (key >= np.take(thr, bucket))
    if idx.size and idx.max() == _UNSAFE:
        far = idx == _UNSAFE
        with np.errstate(invalid="ignore"):
            idx[far] = np.argmin(np.abs(t[far][:, None] - levels[None, :]), axis=1)
    return idx


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize one 128-element chunk per block
# ---------------------------------------------------------------------------------------------

_ROWS_PER_PASS = 2048  # vectors per vectorized pass: keeps temporaries in cache, memory bounded


def _row_passes(n: int) -> list[slice]:
    return [slice(a, a + _ROWS_PER_PASS) for a in range(0, n, _ROWS_PER_PASS)]


def _quantize_chunk(x: np.ndarray, kind: str, out: np.ndarray) -> None:
    """``x float32 [n, cd]`` (``cd <= 128``) -> blocks written into ``out uint8 [n, bb]``."""
    n, cd = x.shape
    with np.errstate(over="ignore"):  # a huge key overflows ss to inf, as in C: norm inf, r 0
        ss = np.cumsum(x * x, axis=1, dtype=np.float32)[:, -1]  # sequential, no FMA
    norm = np.sqrt(ss)
    inv = np.zeros(n, np.float32)
    np.divide(_ONE, norm, out=inv, where=norm > _EPS)
    r = rotate(x * inv[:, None], cd)
    m = np.max(np.abs(r), axis=1)
    m[m < _EPS] = _ONE
    s = CENT_MAX[kind] / m
    idx = nearest_centroid(r * s[:, None], CENTROIDS[kind])
    out[:] = 0
    header = out[:, :HEADER_BYTES].view("<u2")  # [n, 4]: norm, 0, inv_std, 0
    header[:, 0] = f16_trunc(norm)
    header[:, 2] = f16_trunc(s)
    packed = pack_indices(idx, _BITS[kind])
    out[:, HEADER_BYTES:HEADER_BYTES + packed.shape[1]] = packed


def _header(blocks: np.ndarray, cd: int) -> tuple[np.ndarray, np.ndarray]:
    """``blocks uint8 [n, bb]`` -> decoded ``(norm, s)`` float32 ``[n]`` (``s``: the inv_std)."""
    header = np.ascontiguousarray(blocks[:, :HEADER_BYTES]).view("<u2")
    norm = f16_decode(header[:, 0])
    s = f16_decode(header[:, 2])
    s = np.where(s < _EPS, np.sqrt(np.float32(cd)), s)  # never produced by quantize
    return norm, s


def _dequantize_chunk(blocks: np.ndarray, kind: str, cd: int) -> np.ndarray:
    """``blocks uint8 [n, bb]`` -> keys ``float32 [n, cd]``, exactly as quant.cpp decodes."""
    norm, s = _header(blocks, cd)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        step = _ONE / s
        # lut[j] = C[j] * step, so y[i] = lut[idx[i]] is the same float as C[idx[i]] * step
        y = CENTROIDS[kind][unpack_indices(blocks[:, HEADER_BYTES:], _BITS[kind], cd)]
        y = inverse_rotate(y * step[:, None], cd)
        return y * norm[:, None]


def quantize(x, kind: str) -> np.ndarray:
    """Keys ``float32 [..., d]`` -> blocks ``uint8 [..., n_chunks, block_bytes(kind)]``.

    ``n_chunks = ceil(d / 128)``: consecutive 128-element chunks, each an independent block
    (the last one's length is the remainder). Byte-identical to quant.cpp's
    ``tq_turbo_kv_*_quantize_ref``. float16 input is converted exactly; float64 is refused
    (see :func:`_as_float32`); non-finite input raises ``ValueError`` naming the element.
    """
    _check_kind(kind)
    x = _as_float32(x, "x")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., d] with d >= 1, got shape {x.shape}")
    _check_finite(x, "x")
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    out = np.empty((rows.shape[0], _n_chunks(d), block_bytes(kind)), np.uint8)
    for c, (lo, hi) in enumerate(_chunks(d)):
        for part in _row_passes(rows.shape[0]):
            _quantize_chunk(rows[part, lo:hi], kind, out[part, c])
    return out.reshape(*x.shape[:-1], *out.shape[1:])


def dequantize(blocks: np.ndarray, kind: str, d: int) -> np.ndarray:
    """Blocks ``uint8 [..., n_chunks, block_bytes(kind)]`` -> keys ``float32 [..., d]``.

    Bit-identical to quant.cpp's ``tq_turbo_kv_*_dequantize_ref``.
    """
    _check_kind(kind)
    d = _check_d(d)
    return _dequantize(_check_blocks(blocks, kind, d), kind, d)


def _dequantize(blocks: np.ndarray, kind: str, d: int) -> np.ndarray:
    flat = blocks.reshape(-1, *blocks.shape[-2:])
    out = np.empty((flat.shape[0], d), np.float32)
    for c, (lo, hi) in enumerate(_chunks(d)):
        for part in _row_passes(flat.shape[0]):
            out[part, lo:hi] = _dequantize_chunk(flat[part, c], kind, hi - lo)
    return out.reshape(*blocks.shape[:-2], d)


# ---------------------------------------------------------------------------------------------
# Attention scores against compressed keys
# ---------------------------------------------------------------------------------------------

def _rotated_keys(blocks: np.ndarray, kind: str, d: int, path: str) -> np.ndarray:
    """Blocks ``[..., N, n_chunks, bb]`` -> float32 ``[..., N, d]`` keys in rotated space.

    Entry ``i`` of chunk ``c`` is ``norm_c * C[idx_i] / s_c`` (``fp32_codebook``) or
    ``norm_c * T[idx_i] * (R / s_c)`` (``int8_codebook``), so that one matmul with the rotated
    queries gives every score. float32, as quant.cpp evaluates it; the rounding and summation
    order differ from the C code's (the format leaves both free), which keeps scores within
    1e-5 of a row's largest score of quant.cpp's.
    """
    flat = blocks.reshape(-1, *blocks.shape[-2:])
    keys = np.empty((flat.shape[0], d), np.float32)
    if path == "fp32_codebook":
        table, unit = CENTROIDS[kind], np.float32(1.0)
    else:
        table, unit = INT8_TABLES[kind].astype(np.float32), INT8_RECIP[kind]
    for c, (lo, hi) in enumerate(_chunks(d)):
        for part in _row_passes(flat.shape[0]):
            chunk = flat[part, c]
            norm, s = _header(chunk, hi - lo)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                factor = norm * (unit / s)
            idx = unpack_indices(chunk[:, HEADER_BYTES:], _BITS[kind], hi - lo)
            keys[part, lo:hi] = table[idx] * factor[:, None]
    return keys.reshape(*blocks.shape[:-2], d)


@lru_cache(maxsize=None)
def _rotation_matrix(n2: int) -> np.ndarray:
    """``float32 [n2, n2]`` R with ``rotate(x) = x @ R.T`` in exact arithmetic: the scaled
    Sylvester-Hadamard matrix times the sign flips. Only for queries, whose rotation the format
    leaves to float rounding (a matmul is one BLAS call where the butterfly is 2 log2(n2)
    passes over the data); quantization always uses the exact butterfly."""
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < n2:
        h = np.block([[h, h], [h, -h]])
    signs = np.where(np.arange(n2) % 2 == 0, -1.0, 1.0)
    r = (h * signs[None, :] / np.sqrt(n2)).astype(np.float32)
    r.flags.writeable = False
    return r


def _rotate_chunks(q: np.ndarray, d: int) -> np.ndarray:
    """Queries ``float32 [..., d]`` -> each 128-element chunk rotated on its own (float32,
    through :func:`_rotation_matrix`)."""
    out = q.copy()
    for lo, hi in _chunks(d):
        n2 = _pow2_floor(hi - lo)
        out[..., lo:lo + n2] = q[..., lo:lo + n2] @ _rotation_matrix(n2).T
    return out


def scores(q, blocks: np.ndarray, kind: str, d: int, path: str = "int8_codebook") -> np.ndarray:
    """``q . k`` of queries against compressed keys, as quant.cpp's chosen path reads them.

    ``q float32 [..., M, d]``, ``blocks uint8 [..., N, n_chunks, block_bytes]`` (leading batch
    axes broadcast, e.g. ``n_kv_heads``) -> ``float32 [..., M, N]``, not scaled by
    ``1/sqrt(d)``. Paths (``PATHS``):

    - ``dequant``: ``q . dequantize(block)``;
    - ``fp32_codebook``: ``norm * sum_i rotate(q)[i] * C[idx_i] / s`` per chunk;
    - ``int8_codebook``: the same with ``C[idx_i] / s`` replaced by ``T[idx_i] * (R / s)``
      (quant.cpp's SIMD builds; about 0.5% of a score away from the exact paths).

    A head of several chunks sums its chunks' scores. Every key block is decoded once and all
    scores come from one float32 matmul.
    """
    _check_kind(kind)
    if path not in PATHS:
        raise ValueError(f"unknown scores path {path!r}; one of {PATHS}")
    d = _check_d(d)
    q = _as_float32(q, "q")
    if q.ndim < 2 or q.shape[-1] != d:
        raise ValueError(f"q must be [..., M, d={d}], got shape {q.shape}")
    _check_blocks(blocks, kind, d)
    if blocks.ndim < 3:
        raise ValueError(f"blocks must be [..., N, n_chunks, {block_bytes(kind)}], got shape "
                         f"{blocks.shape}")
    try:
        np.broadcast_shapes(q.shape[:-2], blocks.shape[:-3])
    except ValueError:
        raise ValueError(f"batch axes of q {q.shape[:-2]} and blocks {blocks.shape[:-3]} do not "
                         f"broadcast") from None
    _check_finite(q, "q")
    if path == "dequant":
        qr, keys = q, _dequantize(blocks, kind, d)
    else:
        qr, keys = _rotate_chunks(q, d), _rotated_keys(blocks, kind, d, path)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.matmul(qr, np.swapaxes(keys, -1, -2))


# ---------------------------------------------------------------------------------------------
# Value formats for a turbo K cache (quant.cpp never turbo-quantizes values)
# ---------------------------------------------------------------------------------------------

V_TYPES = ("fp16", "fp32", "q4", "q2")
V_GROUP = 32  # values per q4 / q2 group
Q2_LEVELS = _frozen(np.array([-1.5104, -0.4528, 0.4528, 1.5104], np.float32))  # Lloyd-Max 2-bit
_Q4_MAX = np.float32(7.0)
_V_PACKED = {"q4": 16, "q2": 8}  # packed bytes per group; each group also has a float32 scale


def _check_v_type(v_type: str) -> None:
    if v_type not in V_TYPES:
        raise ValueError(f"unknown value type {v_type!r}; one of {V_TYPES}")


def v_bytes(v_type: str, d: int) -> int:
    """Bytes one value vector of ``d`` elements takes: 2d, 4d, 20 or 12 per 32-value group."""
    _check_v_type(v_type)
    d = _check_d(d)
    if v_type in ("fp16", "fp32"):
        return d * (2 if v_type == "fp16" else 4)
    return -(-d // V_GROUP) * (4 + _V_PACKED[v_type])


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's ``roundf`` (half away from zero) of float32 ``v``, as float64 integers (exact)."""
    v = v.astype(np.float64)
    return np.copysign(np.floor(np.abs(v) + 0.5), v)  # |v| + 0.5 is exact in float64


def quantize_v(x, v_type: str) -> np.ndarray:
    """Values ``float32 [..., d]`` -> ``uint8 [..., v_bytes(v_type, d)]``.

    ``fp16``: IEEE round-to-nearest-even halves; ``fp32``: the floats. ``q4`` / ``q2``: per
    group of 32 values (the last group may be short), a little-endian float32 scale ``dq`` then
    the packed codes, as quant.cpp's ``tq_quantize_row_q4`` / ``_q2`` compute them:

    - q4: ``dq = absmax / 7``; ``q = roundf(x * (1/dq)) + 8`` clamped to 0..15 (0 when
      ``dq <= 1e-10``, i.e. ``q = 8``); two codes per byte, even element in the low nibble.
    - q2: ``dq = absmax / 1.5104``; ``q`` = nearest of ``Q2_LEVELS`` to ``x * (1/dq)`` (first
      strict minimum); four codes per byte, LSB first.

    Bytes past the last element are 0.
    """
    _check_v_type(v_type)
    x = _as_float32(x, "x")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., d] with d >= 1, got shape {x.shape}")
    _check_finite(x, "x")
    lead, d = x.shape[:-1], x.shape[-1]
    if v_type == "fp16":
        return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*lead, 2 * d)
    if v_type == "fp32":
        return np.ascontiguousarray(x.astype("<f4")).view(np.uint8).reshape(*lead, 4 * d)
    n_groups = -(-d // V_GROUP)
    groups = np.zeros((*lead, n_groups * V_GROUP), np.float32)
    groups[..., :d] = x  # zero padding leaves absmax unchanged
    groups = groups.reshape(*lead, n_groups, V_GROUP)
    absmax = np.max(np.abs(groups), axis=-1)
    dq = absmax / (_Q4_MAX if v_type == "q4" else Q2_LEVELS[-1])
    inv = np.zeros_like(dq)
    np.divide(_ONE, dq, out=inv, where=dq > _EPS)
    v = groups * inv[..., None]
    if v_type == "q4":
        codes = np.clip(_round_half_away(v) + 8, 0, 15).astype(np.uint8)
    else:
        codes = nearest_centroid(v, Q2_LEVELS).astype(np.uint8)
    codes = codes.reshape(*lead, n_groups * V_GROUP)
    codes[..., d:] = 0  # elements past d are not stored: their bits stay 0
    packed = pack_indices(codes, 4 if v_type == "q4" else 2)
    out = np.empty((*lead, n_groups, 4 + _V_PACKED[v_type]), np.uint8)
    out[..., :4] = dq.astype("<f4")[..., None].view(np.uint8)
    out[..., 4:] = packed.reshape(*lead, n_groups, _V_PACKED[v_type])
    return out.reshape(*lead, -1)


def dequantize_v(data: np.ndarray, v_type: str, d: int) -> np.ndarray:
    """``uint8 [..., v_bytes(v_type, d)]`` -> values ``float32 [..., d]``.

    q4: ``(q - 8) * dq``; q2: ``Q2_LEVELS[q] * dq`` (float32, one rounding), as quant.cpp.
    """
    _check_v_type(v_type)
    d = _check_d(d)
    _check_uint8(data, "data")
    nb = v_bytes(v_type, d)
    if data.ndim == 0 or data.shape[-1] != nb:
        raise ValueError(f"{v_type} values of d={d} take {nb} bytes; got data of shape "
                         f"{data.shape}")
    data = np.ascontiguousarray(data)
    lead = data.shape[:-1]
    if v_type == "fp16":
        return data.view("<f2").astype(np.float32)
    if v_type == "fp32":
        return data.view("<f4").astype(np.float32)
    n_groups = -(-d // V_GROUP)
    grouped = data.reshape(*lead, n_groups, 4 + _V_PACKED[v_type])
    dq = np.ascontiguousarray(grouped[..., :4]).view("<f4")  # [..., n_groups, 1]
    nbits = 4 if v_type == "q4" else 2
    codes = unpack_indices(np.ascontiguousarray(grouped[..., 4:]), nbits, V_GROUP)
    if v_type == "q4":
        levels = codes.astype(np.float32) - np.float32(8)
    else:
        levels = Q2_LEVELS[codes]
    with np.errstate(invalid="ignore", over="ignore"):
        out = levels * dq.astype(np.float32)
    return out.reshape(*lead, n_groups * V_GROUP)[..., :d]
