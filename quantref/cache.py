"""KV caches: how keys and values are stored, and how attention reads them back.

The model hands a cache each layer's new keys (after RoPE) and values, then asks it for the
attention scores of its queries and for the values; masking, the ``1/sqrt(head_dim)`` scale and
the softmax stay in the model. A cache is a K *codec* and a V *codec* over growable buffers:

- a codec's ``encode`` turns float32 ``[n_kv_heads, T, head_dim]`` into the bytes a kernel
  would store (a tuple of arrays whose first two axes are ``[n_kv_heads, T]``),
- its ``decode`` reads them back to float32, and its ``scores`` computes ``q . k`` against
  the stored form (compressed formats: exactly as their reference engine reads them).

Cache types (``kv=``): ``fp32``, ``fp16``; llama.cpp's ``q8_0`` and ``q4_0`` as llama.cpp runs
them by default (K and V Hadamard-rotated when ``head_dim`` is a multiple of 64, its block
formats and run-time rounding, its CPU flash-attention dot product with the query quantized to
Q8_0) and ``q8_0_norot`` / ``q4_0_norot`` (the same without the rotation:
``LLAMA_ATTN_ROT_DISABLE=1``, and llama.cpp before PR #21038); mlx-lm's affine
``mlx_q8`` / ``mlx_q4`` (QuantizedKVCache: groups of 64, a scale and a bias per group); and
quant.cpp's ``turbo_kv_3b`` / ``turbo_kv_4b`` / ``turbo_kv_5b`` key formats, with ``v=`` one of
``fp16`` (default), ``fp32``, ``q4``, ``q2``, ``k_window=W`` (the newest W keys also kept in
float32 and used instead of their blocks) and ``score_path=`` (see :mod:`quantref.turbo_kv`).

Sizes are the true sizes of what is stored: ``nbytes`` and ``bytes_per_token``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "GGML_TYPES",
    "KV_TYPES",
    "TURBO_V_TYPES",
    "CacheSizes",
    "Codec",
    "KVCache",
    "check_options",
    "hadamard",
    "kv_label",
    "make_cache",
    "rotation_sizes",
]

Stored = tuple[np.ndarray, ...]  # one codec's arrays, each [n_kv_heads, T, ...]


# ---------------------------------------------------------------------------------------------
# Codecs
# ---------------------------------------------------------------------------------------------

class Codec:
    """How one of K or V is stored. Subclasses set ``name`` and ``bits`` (per element)."""

    name: str = "?"
    bits: float = 32.0  # stored bits per element, scales and headers included

    def __init__(self, head_dim: int):
        self.head_dim = head_dim

    def encode(self, x: np.ndarray) -> Stored:
        """``x float32 [n_kv_heads, T, head_dim]`` -> stored arrays ``[n_kv_heads, T, ...]``."""
        raise NotImplementedError

    def decode(self, stored: Stored) -> np.ndarray:
        """Stored arrays ``[n_kv_heads, L, ...]`` -> ``float32 [n_kv_heads, L, head_dim]``."""
        raise NotImplementedError

    def scores(self, q: np.ndarray, stored: Stored) -> np.ndarray:
        """``q float32 [n_kv_heads, M, head_dim]`` -> ``q . k`` as ``float32 [n_kv_heads, M, L]``."""
        return q @ self.decode(stored).transpose(0, 2, 1)


class Float32Codec(Codec):
    name, bits = "fp32", 32.0

    def encode(self, x):
        return (np.ascontiguousarray(x, dtype=np.float32),)

    def decode(self, stored):
        return stored[0]


class Float16Codec(Codec):
    """IEEE half, round to nearest even (NumPy's cast), as quant.cpp and llama.cpp store fp16."""

    name, bits = "fp16", 16.0

    def encode(self, x):
        return (x.astype(np.float16),)

    def decode(self, stored):
        return stored[0].astype(np.float32)


def hadamard(x: np.ndarray, n: int) -> np.ndarray:
    """``x float32 [..., m]`` (``m`` a multiple of ``n``) -> each run of ``n`` values times the
    ``n x n`` orthonormal Walsh-Hadamard matrix ``H`` (``H[i, j] = (-1)^popcount(i & j) /
    sqrt(n)``, symmetric, ``H @ H = I``), float32.

    Computed as llama.cpp's CPU backend computes the rotation of its quantized KV cache (a
    ``mul_mat`` marked ``GGML_HINT_SRC0_IS_HADAMARD`` runs ``ggml_compute_forward_fwht``,
    ``ggml-cpu/ops.cpp``): scale by ``1.0f / sqrtf(n)`` first, then the butterflies
    ``(u + v, u - v)`` at distances 1, 2, 4, ... ``n / 2``, each in float32; the same roundings,
    so the same bits. ``n`` must be a power of two.
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    shape = x.shape
    if shape[-1] % n:
        raise ValueError(f"rows of {shape[-1]} values are not a whole number of {n}-runs")
    y = np.asarray(x, dtype=np.float32).reshape(-1, n) * (np.float32(1) / np.sqrt(np.float32(n)))
    half = 1
    while half < n:
        pairs = y.reshape(-1, n // (2 * half), 2, half)
        u = pairs[:, :, 0].copy()
        pairs[:, :, 0] += pairs[:, :, 1]  # u + v
        np.subtract(u, pairs[:, :, 1], out=pairs[:, :, 1])  # u - v
        half *= 2
    return y.reshape(shape)


def rotation_sizes(head_dim: int) -> tuple[int, int]:
    """The Hadamard sizes (K, V) llama.cpp rotates a quantized cache's heads by; 0: none.

    Since llama.cpp PR #21038 (``llama-kv-cache.cpp``), a quantized K (V) cache is rotated when
    ``head_dim`` is a multiple of 64 (``LLAMA_ATTN_ROT_DISABLE=1`` turns it off): K by the
    largest power of two >= 64 that divides ``head_dim``, V always by 64.
    """
    if head_dim % 64:
        return 0, 0
    k = 64
    while head_dim % (2 * k) == 0:
        k *= 2
    return k, 64


class GGMLCodec(Codec):
    """llama.cpp's quantized KV cache: each head's row in ggml blocks (Q8_0 or Q4_0), as
    llama.cpp's CPU backend writes and reads it.

    ``rotation=n`` (llama.cpp's default since PR #21038, see :func:`rotation_sizes`): rows are
    Hadamard-rotated in runs of ``n`` (:func:`hadamard`) before they are quantized, and so is
    the query; ``decode`` rotates back (``H @ H = I``), so keys and values read back in the
    model's own basis. llama.cpp instead rotates the attention *output* back; ``H`` is linear,
    so that is the same sum, rounded in another order (float32 noise, ~1e-7 relative).
    ``rotation=0``: the unrotated cache (``q8_0_norot`` / ``q4_0_norot``, llama.cpp with
    ``LLAMA_ATTN_ROT_DISABLE=1``).

    Blocks are made by llama.cpp's run-time quantizer (``quants.quantize(..., runtime=True)``:
    for Q8_0 the x86 one). ``scores``: the CPU flash attention (``ggml-cpu/ops.cpp``,
    ``flash_attn_ext``) converts the (rotated) query to K's ``vec_dot_type`` (Q8_0 for both
    types) and takes ``ggml_vec_dot_q{8,4}_0_q8_0``: per 32-block an exact integer dot product
    of the codes, times the product of the two scales, summed over blocks in float32. We do the
    same: the integer sums are float32 matrix products of small integers (below 2^24: exact),
    and only the order of the float32 sum over blocks differs (AVX2 keeps 8 lanes).
    """

    def __init__(self, head_dim: int, qtype_name: str, rotation: int = 0, name: str | None = None):
        from gguf import GGMLQuantizationType

        from . import quants

        self.qtype = GGMLQuantizationType[qtype_name.upper()]
        block_elems, block_bytes = quants.BLOCKS[self.qtype]
        if head_dim % block_elems:
            raise ValueError(f"kv={name or qtype_name} needs head_dim divisible by {block_elems}, "
                             f"got {head_dim}")
        if rotation and head_dim % rotation:
            raise ValueError(f"a rotation of {rotation} does not divide head_dim {head_dim}")
        super().__init__(head_dim)
        self.name = name or qtype_name
        self.rotation = rotation
        self.bits = 8.0 * block_bytes / block_elems
        self._quants = quants
        self._q8_0 = GGMLQuantizationType.Q8_0

    def _rotate(self, x: np.ndarray) -> np.ndarray:
        return hadamard(x, self.rotation) if self.rotation else np.ascontiguousarray(x, np.float32)

    def encode(self, x):
        return (self._quants.quantize(self._rotate(x), self.qtype, runtime=True),)

    def decode(self, stored):
        # H is its own inverse: rotating the dequantized rows again brings them back.
        return self._rotate(self._quants.dequantize(stored[0], self.qtype))

    def scores(self, q, stored):
        q8 = self._quants.quantize(self._rotate(q), self._q8_0, runtime=True)
        q_codes, q_d = _ggml_codes(q8, "Q8_0")
        k_codes, k_d = _ggml_codes(stored[0], self.qtype.name)
        # block-major, contiguous: NumPy hands contiguous stacks to BLAS
        q_codes = np.ascontiguousarray(q_codes.transpose(0, 2, 1, 3))  # [n, nb, M, 32]
        k_codes = np.ascontiguousarray(k_codes.transpose(0, 2, 3, 1))  # [n, nb, 32, L]
        # |sum| <= 32 * 127 * 127 < 2^24: float32 products of these integers are exact
        isum = q_codes @ k_codes  # [n, nb, M, L]
        # each block's integer sum times (d_q * d_k), summed over blocks in float32
        out = np.multiply(q_d[:, :, 0, None], k_d[:, None, :, 0])
        out *= isum[:, 0]
        for b in range(1, isum.shape[1]):
            term = np.multiply(q_d[:, :, b, None], k_d[:, None, :, b])
            term *= isum[:, b]
            out += term
        return out


def _ggml_codes(data: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 / Q4_0 bytes ``uint8 [n, L, row_bytes]`` -> (codes ``float32 [n, L, nb, 32]``,
    scales ``float32 [n, L, nb]``); Q4_0 codes as ``q - 8``, in ggml's element order."""
    from . import quants

    n, L = data.shape[:2]
    if qtype == "Q8_0":
        b = np.ascontiguousarray(data).view(quants.BLOCK_Q8_0).reshape(n, L, -1)
        codes = b["qs"].astype(np.float32)
    else:
        b = np.ascontiguousarray(data).view(quants.BLOCK_Q4_0).reshape(n, L, -1)
        qs = b["qs"]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32) - 8
    return codes, b["d"].astype(np.float32)


class AffineCodec(Codec):
    """mlx-lm's QuantizedKVCache: ``mx.quantize(x, group_size=64, bits)``, fp16 scale and bias.

    Keys and values reach mlx-lm's cache in the model's dtype, float16 for the usual checkpoints,
    so they are rounded to float16 first and quantized as MLX quantizes float16 (scales and
    biases in float16).
    """

    group_size = 64

    def __init__(self, head_dim: int, bits: int):
        if head_dim % self.group_size:
            raise ValueError(f"kv=mlx_q{bits} needs head_dim divisible by {self.group_size}, "
                             f"got {head_dim}")
        super().__init__(head_dim)
        from . import quants

        self.name = f"mlx_q{bits}"
        self.n_bits = bits
        self.bits = bits + 2 * 16 / self.group_size  # + an fp16 scale and bias per group
        self._quants = quants

    def encode(self, x):
        return self._quants.quantize_affine(x.astype(np.float16), self.n_bits, self.group_size)

    def decode(self, stored):
        w, scales, biases = stored
        out = self._quants.dequantize_affine(w, scales, biases, self.n_bits, self.group_size)
        return out.astype(np.float32)


class TurboKeyCodec(Codec):
    """quant.cpp's turbo_kv key blocks; scores read the blocks through the oracle's paths."""

    def __init__(self, head_dim: int, kind: str, score_path: str = "int8_codebook"):
        from . import turbo_kv

        if kind not in turbo_kv.KINDS:
            raise ValueError(f"unknown turbo_kv kind {kind!r}; one of {turbo_kv.KINDS}")
        if score_path not in turbo_kv.PATHS:
            raise ValueError(f"unknown score_path {score_path!r}; one of {turbo_kv.PATHS}")
        super().__init__(head_dim)
        self.name, self.kind, self.score_path = kind, kind, score_path
        n_chunks = -(-head_dim // turbo_kv.BLOCK)
        self.bits = 8.0 * n_chunks * turbo_kv.block_bytes(kind) / head_dim
        self._tkv = turbo_kv

    def encode(self, x):
        return (self._tkv.quantize(np.ascontiguousarray(x, dtype=np.float32), self.kind),)

    def decode(self, stored):
        return self._tkv.dequantize(stored[0], self.kind, self.head_dim)

    def scores(self, q, stored):
        return self._tkv.scores(q, stored[0], self.kind, self.head_dim, path=self.score_path)


class TurboValueCodec(Codec):
    """The V formats that go with a turbo K cache in quant.cpp: ``q4`` and ``q2`` per 32 values."""

    def __init__(self, head_dim: int, v_type: str):
        from . import turbo_kv

        super().__init__(head_dim)
        self.name, self.v_type = v_type, v_type
        self.bits = 8.0 * turbo_kv.v_bytes(v_type, head_dim) / head_dim
        self._tkv = turbo_kv

    def encode(self, x):
        return (self._tkv.quantize_v(np.ascontiguousarray(x, dtype=np.float32), self.v_type),)

    def decode(self, stored):
        return self._tkv.dequantize_v(stored[0], self.v_type, self.head_dim)


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------

class _Buffer:
    """Arrays ``[n_kv_heads, capacity, ...]`` that grow along the token axis by doubling."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] | None = None

    def write(self, at: int, parts: Stored) -> None:
        if self.arrays is None:
            self.arrays = [np.empty((p.shape[0], max(16, 2 * p.shape[1]), *p.shape[2:]), p.dtype)
                           for p in parts]
        end = at + parts[0].shape[1]
        if end > self.arrays[0].shape[1]:
            cap = max(end, 2 * self.arrays[0].shape[1])
            grown = []
            for a in self.arrays:
                g = np.empty((a.shape[0], cap, *a.shape[2:]), a.dtype)
                g[:, :at] = a[:, :at]
                grown.append(g)
            self.arrays = grown
        for a, p in zip(self.arrays, parts):
            a[:, at:end] = p

    def view(self, n: int) -> Stored:
        assert self.arrays is not None
        return tuple(a[:, :n] for a in self.arrays)

    def nbytes(self, n: int) -> int:
        if self.arrays is None:
            return 0
        return sum(a[:, :n].nbytes for a in self.arrays)


class CacheSizes:
    """The size accounting both halves' caches share: K and V codecs (``bits`` per element),
    ``n_layers * n_kv_heads * head_dim`` elements per token, a k-window of float32 keys, and
    buffers ``_k`` / ``_v`` that can tell their stored bytes (``nbytes(n)``)."""

    @property
    def bits_per_element(self) -> tuple[float, float]:
        """Stored bits per K element and per V element."""
        return self.k_codec.bits, self.v_codec.bits

    @property
    def bytes_per_token(self) -> float:
        """Bytes one more token adds to the cache, across layers, K and V."""
        elems = self.n_layers * self.n_kv_heads * self.head_dim
        return elems * (self.k_codec.bits + self.v_codec.bits) / 8

    @property
    def window_bytes(self) -> int:
        """The fixed cost of the k-window: W float32 keys per layer and KV head."""
        return self.n_layers * self.n_kv_heads * self.k_window * self.head_dim * 4

    @property
    def nbytes(self) -> int:
        """Bytes the stored tokens take (the k-window's float32 keys counted once, W at most)."""
        n = self.length
        total = sum(b.nbytes(n) for b in self._k) + sum(b.nbytes(n) for b in self._v)
        if self.k_window:
            total += self.n_layers * self.n_kv_heads * min(n, self.k_window) * self.head_dim * 4
        return total


class KVCache(CacheSizes):
    """Keys and values of every layer, stored by a K codec and a V codec.

    Protocol with the model, per forward pass of ``T`` tokens: for each layer ``append`` the
    chunk's K/V, then ask ``scores`` and ``values`` (which see the committed tokens plus this
    chunk); after all layers, ``commit(T)``. An interrupted pass leaves the committed state
    intact: the next pass overwrites the uncommitted rows.
    """

    def __init__(self, k_codec: Codec, v_codec: Codec, *, n_layers: int, n_kv_heads: int,
                 head_dim: int, k_window: int = 0, kind: str | None = None):
        if k_window < 0:
            raise ValueError(f"k_window must be >= 0, got {k_window}")
        self.k_codec, self.v_codec = k_codec, v_codec
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.k_window = k_window
        self.kind = kind or k_codec.name
        self.length = 0  # committed tokens
        self._pending = [0] * n_layers  # tokens appended to a layer but not yet committed
        self._k = [_Buffer() for _ in range(n_layers)]
        self._v = [_Buffer() for _ in range(n_layers)]
        # k-window: per layer, float32 keys of the newest committed tokens (at most W) followed
        # by the pending chunk's: [n_kv_heads, n, head_dim], ending at position L - 1.
        self._k_exact: list[np.ndarray | None] = [None] * n_layers

    # The protocol ---------------------------------------------------------------------------
    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store this chunk's ``k, v float32 [n_kv_heads, T, head_dim]`` for ``layer``."""
        T = k.shape[1]
        self._k[layer].write(self.length, self.k_codec.encode(k))
        self._v[layer].write(self.length, self.v_codec.encode(v))
        if self.k_window:
            kept = self._k_exact[layer]
            k32 = np.asarray(k, np.float32)
            if kept is not None and self._pending[layer]:  # re-append after an interruption
                kept = kept[:, : kept.shape[1] - self._pending[layer]]
            self._k_exact[layer] = k32 if kept is None else np.concatenate([kept, k32], axis=1)
        self._pending[layer] = T

    def scores(self, layer: int, q: np.ndarray) -> np.ndarray:
        """``q float32 [n_kv_heads, n_groups, T, head_dim]`` -> ``[n_kv_heads, n_groups, T, L]``.

        Unscaled dot products of each query with every stored key; the queries are the newest
        ``T`` positions.
        """
        n_kv, n_groups, T, d = q.shape
        L = self.length + self._pending[layer]
        rows = q.reshape(n_kv, n_groups * T, d)
        s = self.k_codec.scores(rows, self._k[layer].view(L)).reshape(n_kv, n_groups, T, L)
        if self.k_window:
            # The newest W keys of each query (positions p-W+1 .. p) are read in float32.
            exact = self._k_exact[layer]  # [n_kv, L - lo, d]: positions lo .. L-1
            lo = L - exact.shape[1]
            s_exact = (rows @ exact.transpose(0, 2, 1)).reshape(n_kv, n_groups, T, L - lo)
            pos_q = L - T + np.arange(T)[:, None]
            age = pos_q - np.arange(lo, L)[None, :]  # [T, L - lo]
            in_window = (age >= 0) & (age < self.k_window)
            s[..., lo:] = np.where(in_window, s_exact, s[..., lo:])
        return s

    def values(self, layer: int) -> np.ndarray:
        """``float32 [n_kv_heads, L, head_dim]``: the stored values, decoded."""
        return self.v_codec.decode(self._v[layer].view(self.length + self._pending[layer]))

    def keys(self, layer: int) -> np.ndarray:
        """``float32 [n_kv_heads, L, head_dim]``: the stored keys, decoded (for analysis)."""
        return self.k_codec.decode(self._k[layer].view(self.length + self._pending[layer]))

    def stored(self, layer: int) -> tuple[Stored, Stored]:
        """The raw stored arrays ``(K parts, V parts)`` of ``layer``, ``[n_kv_heads, L, ...]``."""
        L = self.length + self._pending[layer]
        return self._k[layer].view(L), self._v[layer].view(L)

    def commit(self, n: int) -> None:
        """Make the ``n`` tokens appended to every layer part of the cache."""
        if any(p != n for p in self._pending):
            raise RuntimeError(f"commit({n}) but layers hold {self._pending} new tokens")
        self.length += n
        self._pending = [0] * self.n_layers
        if self.k_window:  # a later query's window reaches back at most W - 1 committed keys
            self._k_exact = [e[:, -self.k_window:] for e in self._k_exact]

    def __repr__(self) -> str:
        return f"KVCache({kv_label(self)}, {self.length} tokens, {self.nbytes} bytes)"


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------

GGML_TYPES = ("q8_0", "q4_0", "q8_0_norot", "q4_0_norot")  # llama.cpp's, see GGMLCodec
KV_TYPES = ("fp32", "fp16", *GGML_TYPES, "mlx_q8", "mlx_q4",
            "turbo_kv_3b", "turbo_kv_4b", "turbo_kv_5b")
TURBO_V_TYPES = ("fp16", "fp32", "q4", "q2")


def _codecs(kv: str, head_dim: int, v: str | None, score_path: str) -> tuple[Codec, Codec]:
    if kv == "fp32":
        return Float32Codec(head_dim), Float32Codec(head_dim)
    if kv == "fp16":
        return Float16Codec(head_dim), Float16Codec(head_dim)
    if kv in GGML_TYPES:
        base = kv[:4]
        k_rot, v_rot = (0, 0) if kv.endswith("_norot") else rotation_sizes(head_dim)
        return GGMLCodec(head_dim, base, k_rot, kv), GGMLCodec(head_dim, base, v_rot, kv)
    if kv in ("mlx_q8", "mlx_q4"):
        bits = int(kv[-1])
        return AffineCodec(head_dim, bits), AffineCodec(head_dim, bits)
    if kv.startswith("turbo_kv_"):
        v = v or "fp16"
        v_codec = {"fp16": Float16Codec, "fp32": Float32Codec}[v](head_dim) \
            if v in ("fp16", "fp32") else TurboValueCodec(head_dim, v)
        return TurboKeyCodec(head_dim, kv, score_path), v_codec
    raise ValueError(f"unknown kv type {kv!r}; one of: {', '.join(KV_TYPES)}")


def check_options(kv: str, v: str | None, k_window: int, score_path: str) -> bool:
    """Validate a cache configuration; True for a turbo_kv K type (the options apply to it)."""
    if kv not in KV_TYPES:
        raise ValueError(f"unknown kv type {kv!r}; one of: {', '.join(KV_TYPES)}")
    turbo = kv.startswith("turbo_kv_")
    if not turbo and (v is not None or k_window or score_path != "int8_codebook"):
        raise ValueError(f"v=, k_window= and score_path= apply to turbo_kv K types, not {kv!r}")
    if turbo and v is not None and v not in TURBO_V_TYPES:
        raise ValueError(f"unknown v type {v!r}; one of: {', '.join(TURBO_V_TYPES)}")
    if k_window < 0:
        raise ValueError(f"k_window must be >= 0, got {k_window}")
    return turbo


def make_cache(kv: str = "fp32", *, n_layers: int, n_kv_heads: int, head_dim: int,
               v: str | None = None, k_window: int = 0,
               score_path: str = "int8_codebook") -> KVCache:
    """A fresh KV cache. ``v``, ``k_window`` and ``score_path`` apply to turbo_kv K types only."""
    turbo = check_options(kv, v, k_window, score_path)
    k_codec, v_codec = _codecs(kv, head_dim, v, score_path)
    return KVCache(k_codec, v_codec, n_layers=n_layers, n_kv_heads=n_kv_heads,
                   head_dim=head_dim, k_window=k_window if turbo else 0, kind=kv)


def kv_label(cache) -> str:
    """A short name for a cache configuration (either half's), e.g.
    ``turbo_kv_4b/v=q4/w=128/fp32_codebook``; the defaults are left out."""
    label = cache.kind
    if cache.kind.startswith("turbo_kv_"):
        if cache.v_codec.name != "fp16":
            label += f"/v={cache.v_codec.name}"
        if cache.k_window:
            label += f"/w={cache.k_window}"
        if cache.k_codec.score_path != "int8_codebook":
            label += f"/{cache.k_codec.score_path}"
    return label
