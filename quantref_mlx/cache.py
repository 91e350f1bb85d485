"""KV caches in MLX: the same cache types, codecs and protocol as :mod:`quantref.cache`.

Everything here builds graph nodes only: appending a chunk's keys writes them into
preallocated buffers with a (lazy) slice update, and ``scores`` / ``values`` read the stored
form back through the format's own decoder, inside the step's graph. Buffers grow in steps of
256 tokens, as mlx-lm's caches do, so a decode step does not reallocate.

Stored forms are the same bits as the NumPy oracle's (each codec says how they map to its bytes):
fp32/fp16 arrays; ggml Q8_0/Q4_0 blocks as (codes, float16 scale) pairs; mlx-lm's affine
(packed uint32, scales, biases); turbo_kv blocks as uint8 ``[.., n_chunks, block_bytes]``.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from quantref.cache import (GGML_TYPES, KV_TYPES, TURBO_V_TYPES, CacheSizes, check_options,
                            kv_label, rotation_sizes)

__all__ = ["GGML_TYPES", "KV_TYPES", "TURBO_V_TYPES", "Codec", "KVCache", "StepCache",
           "hadamard", "kv_label", "make_cache", "rotation_sizes"]

Stored = tuple[mx.array, ...]  # one codec's arrays, each [n_kv_heads, T, ...]
STEP = 256  # buffer growth, in tokens


# ---------------------------------------------------------------------------------------------
# Codecs
# ---------------------------------------------------------------------------------------------

class Codec:
    """How one of K or V is stored; see quantref.cache.Codec."""

    name: str = "?"
    bits: float = 32.0
    plain = False  # keys are plain floats: attention may use MLX's fused kernel

    def __init__(self, head_dim: int):
        self.head_dim = head_dim

    def encode(self, x: mx.array) -> Stored:
        raise NotImplementedError

    def decode(self, stored: Stored) -> mx.array:
        raise NotImplementedError

    def scores(self, q: mx.array, stored: Stored) -> mx.array:
        """``q [n_kv_heads, M, head_dim]`` -> ``[n_kv_heads, M, L]``."""
        return q @ self.decode(stored).transpose(0, 2, 1)


class Float32Codec(Codec):
    name, bits, plain = "fp32", 32.0, True

    def encode(self, x):
        return (x if x.dtype == mx.float32 else x.astype(mx.float32),)  # no needless kernel

    def decode(self, stored):
        return stored[0]


class Float16Codec(Codec):
    name, bits, plain = "fp16", 16.0, True

    def encode(self, x):
        return (x.astype(mx.float16),)

    def decode(self, stored):
        return stored[0].astype(mx.float32)


def hadamard(x: mx.array, n: int) -> mx.array:
    """``x [..., m]`` -> each run of ``n`` values times the orthonormal ``n x n`` Walsh-Hadamard
    matrix, float32, in the order llama.cpp's CPU backend computes it: the same operations as
    :func:`quantref.cache.hadamard` (scale by ``1 / sqrtf(n)``, then butterflies at distances
    1, 2, ... ``n / 2``), so the same bits."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    shape = x.shape
    if shape[-1] % n:
        raise ValueError(f"rows of {shape[-1]} values are not a whole number of {n}-runs")
    scale = mx.array(np.float32(1) / np.sqrt(np.float32(n)))
    y = x.astype(mx.float32).reshape(-1, n) * scale
    half = 1
    while half < n:
        pairs = y.reshape(-1, n // (2 * half), 2, half)
        u, v = pairs[:, :, 0], pairs[:, :, 1]
        y = mx.stack([u + v, u - v], axis=2)
        half *= 2
    return y.reshape(shape)


class GGMLCodec(Codec):
    """llama.cpp's Q8_0 / Q4_0 blocks (stored as codes + float16 scales) as its CPU backend
    writes and reads them: see :class:`quantref.cache.GGMLCodec` (Hadamard rotation of
    ``rotation`` values, run-time quantizer, the query in Q8_0 and integer block sums)."""

    def __init__(self, head_dim: int, qtype_name: str, rotation: int = 0, name: str | None = None):
        from . import quants

        if head_dim % quants.QK:
            raise ValueError(f"kv={name or qtype_name} needs head_dim divisible by {quants.QK}, "
                             f"got {head_dim}")
        if rotation and head_dim % rotation:
            raise ValueError(f"a rotation of {rotation} does not divide head_dim {head_dim}")
        super().__init__(head_dim)
        self.qtype = qtype_name
        self.name = name or qtype_name
        self.rotation = rotation
        self.bits = 8.0 * (2 + (32 if qtype_name == "q8_0" else 16)) / 32
        self._quants = quants

    def _rotate(self, x):
        return hadamard(x, self.rotation) if self.rotation else x

    def encode(self, x):
        return self._quants.quantize(self._rotate(x), self.qtype, runtime=True)

    def decode(self, stored):
        return self._rotate(self._quants.dequantize(*stored, self.qtype))

    def scores(self, q, stored):
        q_codes, q_d = self._quants.quantize(self._rotate(q), "q8_0", runtime=True)
        k_codes, k_d = stored
        k_codes = k_codes.astype(mx.float32)
        if self.qtype == "q4_0":
            k_codes = k_codes - 8.0
        # [n, nb, M, 32] @ [n, nb, 32, L]: exact integer sums (below 2^24) in float32
        isum = q_codes.astype(mx.float32).transpose(0, 2, 1, 3) @ k_codes.transpose(0, 2, 3, 1)
        q_d, k_d = q_d.astype(mx.float32), k_d.astype(mx.float32)
        out = None
        for b in range(isum.shape[1]):  # each block's sum times (d_q * d_k), summed in float32
            term = (q_d[:, :, b, None] * k_d[:, None, :, b]) * isum[:, b]
            out = term if out is None else out + term
        return out


class AffineCodec(Codec):
    """mlx-lm's QuantizedKVCache: ``mx.quantize`` of the float16 keys, groups of 64."""

    group_size = 64

    def __init__(self, head_dim: int, bits: int):
        if head_dim % self.group_size:
            raise ValueError(f"kv=mlx_q{bits} needs head_dim divisible by {self.group_size}, "
                             f"got {head_dim}")
        super().__init__(head_dim)
        self.name = f"mlx_q{bits}"
        self.n_bits = bits
        self.bits = bits + 2 * 16 / self.group_size

    def encode(self, x):
        return tuple(mx.quantize(x.astype(mx.float16), group_size=self.group_size,
                                 bits=self.n_bits))

    def decode(self, stored):
        w, scales, biases = stored
        return mx.dequantize(w, scales, biases, group_size=self.group_size,
                             bits=self.n_bits).astype(mx.float32)


class TurboKeyCodec(Codec):
    """quant.cpp's turbo_kv key blocks, read back through :mod:`quantref_mlx.turbo_kv`."""

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
        from . import turbo_prefill

        # a prefill chunk on CUDA: a warp per chunk, the same bytes (turbo_prefill.quantize)
        blocks = turbo_prefill.quantize(x, self.kind)
        return (self._tkv.quantize(x, self.kind) if blocks is None else blocks,)

    def decode(self, stored):
        return self._tkv.dequantize(stored[0], self.kind, self.head_dim)

    def scores(self, q, stored):
        if self.score_path == "dequant":
            return self._tkv.scores(q, stored[0], self.kind, self.head_dim, path="dequant")
        from .model import on_gpu

        # the same function as turbo_kv.scores, compiled (traced per shape: see KVCache.scores)
        return self._tkv._codebook_scores(self.kind, self.head_dim, self.score_path,
                                          compiled=True, cpu=not on_gpu())(q, stored[0])


class TurboValueCodec(Codec):
    """quant.cpp's ``q4`` / ``q2`` value formats."""

    def __init__(self, head_dim: int, v_type: str):
        from . import turbo_kv

        super().__init__(head_dim)
        self.name, self.v_type = v_type, v_type
        self.bits = 8.0 * turbo_kv.v_bytes(v_type, head_dim) / head_dim
        self._tkv = turbo_kv

    def encode(self, x):
        return (self._tkv.quantize_v(x, self.v_type),)

    def decode(self, stored):
        return self._tkv.dequantize_v(stored[0], self.v_type, self.head_dim)


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------

class _Buffer:
    """MLX arrays ``[n_kv_heads, capacity, ...]``, grown along the token axis in STEP tokens."""

    def __init__(self) -> None:
        self.arrays: list[mx.array] | None = None

    def write(self, at: int, parts: Stored) -> None:
        end = at + parts[0].shape[1]
        cap = 0 if self.arrays is None else self.arrays[0].shape[1]
        if end > cap:
            new_cap = -(-end // STEP) * STEP
            grown = []
            for i, p in enumerate(parts):
                fresh = mx.zeros((p.shape[0], new_cap, *p.shape[2:]), p.dtype)
                if self.arrays is not None and at:
                    fresh[:, :at] = self.arrays[i][:, :at]
                grown.append(fresh)
            self.arrays = grown
        for a, p in zip(self.arrays, parts):
            a[:, at:end] = p  # a lazy slice update: a new graph node bound to the same name

    def view(self, n: int) -> Stored:
        assert self.arrays is not None
        return tuple(a[:, :n] for a in self.arrays)

    def nbytes(self, n: int) -> int:
        if self.arrays is None:
            return 0
        return sum(a[:, :n].nbytes for a in self.arrays)


class KVCache(CacheSizes):
    """See quantref.cache.KVCache: the same protocol (append, scores, values, commit)."""

    def __init__(self, k_codec: Codec, v_codec: Codec, *, n_layers: int, n_kv_heads: int,
                 head_dim: int, k_window: int = 0, kind: str | None = None,
                 sync: Callable[[mx.array], mx.array] | None = None):
        if k_window < 0:
            raise ValueError(f"k_window must be >= 0, got {k_window}")
        self.k_codec, self.v_codec = k_codec, v_codec
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.k_window = k_window
        self.kind = kind or k_codec.name
        self.length = 0
        self._pending = [0] * n_layers
        self._k = [_Buffer() for _ in range(n_layers)]
        self._v = [_Buffer() for _ in range(n_layers)]
        self._k_exact: list[mx.array | None] = [None] * n_layers
        # While a fused decode step holds the k-window (take_window), its float keys live in
        # rings [n_kv_heads, k_window, head_dim], position p in slot p % k_window.
        self._rings: list[mx.array] | None = None
        self._sync = sync or (lambda a: a)

    @property
    def offset(self) -> int:
        """Position of the first token of the chunk being processed."""
        return self.length

    @property
    def fused_attention(self) -> bool:
        """Whether attention may read plain float keys and values with MLX's fused kernel."""
        return self.k_codec.plain and self.v_codec.plain and not self.k_window

    def mask(self, T: int) -> mx.array | None:
        """Additive mask ``[T, L]`` for this chunk's queries; None when T == 1 (one query, the
        newest, sees every stored key)."""
        from .model import causal_mask

        return causal_mask(T, self.length + T) if T > 1 else None

    def append(self, layer: int, k: mx.array, v: mx.array) -> None:
        """Store this chunk's ``k, v float32 [n_kv_heads, T, head_dim]`` for ``layer``."""
        T = k.shape[1]
        self._unring()
        self._k[layer].write(self.length, tuple(self._sync(p) for p in self.k_codec.encode(k)))
        self._v[layer].write(self.length, tuple(self._sync(p) for p in self.v_codec.encode(v)))
        if self.k_window:
            kept = self._k_exact[layer]
            if kept is not None and self._pending[layer]:
                kept = kept[:, : kept.shape[1] - self._pending[layer]]
            self._k_exact[layer] = k if kept is None else mx.concatenate([kept, k], axis=1)
        self._pending[layer] = T

    def scores(self, layer: int, q: mx.array) -> mx.array:
        """``q [n_kv_heads, n_groups, T, head_dim]`` -> ``[n_kv_heads, n_groups, T, L]``."""
        n_kv, n_groups, T, d = q.shape
        L = self.length + self._pending[layer]
        rows = q.reshape(n_kv, n_groups * T, d)
        if getattr(self.k_codec, "score_path", "dequant") != "dequant":
            # turbo_kv's codebook scores are a compiled function, traced per shape: read the
            # whole buffer (its capacity grows every STEP tokens), then keep the first L
            full = tuple(self._k[layer].arrays)
            s = self.k_codec.scores(rows, full)[..., :L].reshape(n_kv, n_groups, T, L)
        else:
            s = self.k_codec.scores(rows, self._k[layer].view(L)).reshape(n_kv, n_groups, T, L)
        if self.k_window:
            exact = self._k_exact[layer]  # positions lo .. L-1
            lo = L - exact.shape[1]
            s_exact = (rows @ exact.transpose(0, 2, 1)).reshape(n_kv, n_groups, T, L - lo)
            age = (L - T + mx.arange(T))[:, None] - mx.arange(lo, L)[None, :]
            in_window = (age >= 0) & (age < self.k_window)
            tail = mx.where(in_window, s_exact, s[..., lo:])
            s = tail if lo == 0 else mx.concatenate([s[..., :lo], tail], axis=-1)
        return self._sync(s)

    def prefill_attention(self, layer: int, q: mx.array, scale: float,
                          sliding_window: int = 0) -> mx.array | None:
        """This chunk's attention output ``float32 [T, n_heads * head_dim]`` for its queries
        ``q float32 [n_heads, T, head_dim]`` (after :meth:`append`), from one CUDA kernel that
        reads the turbo_kv blocks (:mod:`quantref_mlx.turbo_prefill`): scores times ``scale``,
        causal (and within ``sliding_window`` keys if not 0), softmax, values. None where the
        plain graph runs instead: one query row (decode keeps its own path), not CUDA, not a
        turbo_kv cache, or shapes the kernel does not cover."""
        from . import turbo_prefill
        from .fused_decode import TurboSpec

        n_heads, T, d = q.shape
        if T < 2 or not turbo_prefill.available() or self._pending[layer] != T:
            return None
        spec = TurboSpec.of(self)
        if turbo_prefill.why_not(spec, n_heads, self.n_kv_heads, d):
            return None
        (kbuf,), (vbuf,) = self._k[layer].arrays, self._v[layer].arrays
        kw = self._k_exact[layer] if self.k_window else None  # positions L - NX .. L - 1
        return self._sync(turbo_prefill.attend(q, kbuf, vbuf, self.length, spec, scale, kw,
                                               sliding_window))

    def values(self, layer: int) -> mx.array:
        """``float32 [n_kv_heads, L, head_dim]``."""
        return self._sync(self.v_codec.decode(
            self._v[layer].view(self.length + self._pending[layer])))

    def keys(self, layer: int) -> mx.array:
        return self.k_codec.decode(self._k[layer].view(self.length + self._pending[layer]))

    def stored(self, layer: int) -> tuple[Stored, Stored]:
        L = self.length + self._pending[layer]
        return self._k[layer].view(L), self._v[layer].view(L)

    def commit(self, n: int) -> None:
        if any(p != n for p in self._pending):
            raise RuntimeError(f"commit({n}) but layers hold {self._pending} new tokens")
        self.length += n
        self._pending = [0] * self.n_layers
        if self.k_window:
            self._k_exact = [e[:, -self.k_window:] for e in self._k_exact]

    def state(self) -> list[mx.array]:
        """Every array the cache holds (to evaluate together with a step's outputs)."""
        out: list[mx.array] = []
        for b in self._k + self._v:
            out.extend(b.arrays or [])
        out.extend(e for e in self._k_exact if e is not None)
        out.extend(self._rings or [])
        return out

    # Compiled decode steps -------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return 0 if self._k[0].arrays is None else self._k[0].arrays[0].shape[1]

    def reserve(self, capacity: int) -> None:
        """Grow every buffer to ``capacity`` tokens (needs at least one stored token)."""
        if self.capacity >= capacity:
            return
        for b in self._k + self._v:
            b.arrays = [mx.concatenate([a, mx.zeros((a.shape[0], capacity - a.shape[1],
                                                     *a.shape[2:]), a.dtype)], axis=1)
                        for a in b.arrays]

    def take_buffers(self) -> tuple[list[Stored], list[Stored]]:
        """Hand the K and V buffers over (per layer) to a compiled step, keeping no reference,
        so that its slice updates may write them in place instead of copying them."""
        k = [tuple(b.arrays) for b in self._k]
        v = [tuple(b.arrays) for b in self._v]
        for b in self._k + self._v:
            b.arrays = None
        return k, v

    def give_buffers(self, k: list[Stored], v: list[Stored], n: int) -> None:
        """Adopt the buffers a compiled step returned: the cache is ``n`` tokens longer."""
        for b, parts in zip(self._k + self._v, list(k) + list(v)):
            b.arrays = list(parts)
        self.length += n

    def take_window(self) -> list[mx.array]:
        """The k-window's float keys per layer, for a fused decode step to read and extend in
        place: rings ``float32 [n_kv_heads, k_window, head_dim]``, position ``p`` in slot
        ``p % k_window`` (needs a k-window and at least one committed token). The cache keeps
        them, and rebuilds its own view of the window from them when it next needs it."""
        if not self.k_window or not self.length:
            raise ValueError("take_window needs a k-window and a prefilled cache")
        if self._rings is None:
            W, n = self.k_window, min(self.k_window, self.length)
            # the window holds positions length - n .. length - 1; when n < W they are 0 .. n-1
            slots = np.arange(self.length - n, self.length) % W
            rings = []
            for e in self._k_exact:  # [n_kv_heads, n, head_dim], committed keys only
                # Built on the host, once per decoder: a fresh array that owns its memory, so
                # that the kernel's writes into it land in the array the cache holds (an array
                # still to be computed by MLX may be handed to a kernel as a copy).
                ring = np.zeros((e.shape[0], W, e.shape[2]), np.float32)
                ring[:, slots] = np.asarray(e)
                rings.append(mx.array(ring))
            self._rings, self._k_exact = rings, [None] * self.n_layers
        return self._rings

    def give_window(self, rings: list[mx.array]) -> None:
        """Adopt the rings a fused step wrote (:meth:`take_window`)."""
        self._rings = list(rings)

    def _unring(self) -> None:
        """The window back in position order (``_k_exact``) when a fused step held it."""
        if self._rings is None:
            return
        n = min(self.k_window, self.length)
        idx = mx.array((np.arange(self.length - n, self.length) % self.k_window).astype(np.int32))
        self._k_exact = [mx.take(r, idx, axis=1) for r in self._rings]
        self._rings = None

    def __repr__(self) -> str:
        return f"quantref_mlx.KVCache({kv_label(self)}, {self.length} tokens)"


class StepCache:
    """The cache protocol over explicit buffers at a fixed capacity, with the position as an
    array: every decode step then has the same shapes, so ``mx.compile`` traces it once (per
    capacity) and replays it at every position. Keys beyond the position are masked out.

    Built inside the compiled function from its array arguments (:meth:`KVCache.take_buffers`);
    the updated buffers (``k``, ``v``) are the function's outputs (:meth:`KVCache.give_buffers`).
    No k-window here.
    """

    def __init__(self, k_codec: Codec, v_codec: Codec, k: list[Stored], v: list[Stored],
                 offset: mx.array):
        self.k_codec, self.v_codec = k_codec, v_codec
        self.k, self.v = list(k), list(v)
        self.offset = offset  # int32 scalar: the position of this step's first token
        self.capacity = k[0][0].shape[1]
        self._masks: dict[int, mx.array] = {}  # T -> the step's mask, built once for every layer

    @property
    def fused_attention(self) -> bool:
        return self.k_codec.plain and self.v_codec.plain

    def mask(self, T: int) -> mx.array:
        """Additive ``float32 [T, capacity]``: -inf on keys after each query's position. One
        array for every layer of the step: inside ``mx.compile`` two equal ``arange`` nodes are
        not merged, so a mask built per layer costs its kernels once per layer."""
        if T not in self._masks:
            q_pos = self.offset + mx.arange(T)[:, None]
            k_pos = mx.arange(self.capacity)[None, :]
            self._masks[T] = mx.where(k_pos > q_pos, mx.array(-mx.inf, mx.float32),
                                      mx.array(0.0, mx.float32))
        return self._masks[T]

    def append(self, layer: int, k: mx.array, v: mx.array) -> None:
        at = self.offset.reshape(1)
        self.k[layer] = tuple(mx.slice_update(buf, part, at, axes=(1,))
                              for buf, part in zip(self.k[layer], self.k_codec.encode(k)))
        self.v[layer] = tuple(mx.slice_update(buf, part, at, axes=(1,))
                              for buf, part in zip(self.v[layer], self.v_codec.encode(v)))

    def scores(self, layer: int, q: mx.array) -> mx.array:
        n_kv, n_groups, T, d = q.shape
        s = self.k_codec.scores(q.reshape(n_kv, n_groups * T, d), self.k[layer])
        return s.reshape(n_kv, n_groups, T, self.capacity)

    def keys(self, layer: int) -> mx.array:
        return self.k_codec.decode(self.k[layer])

    def values(self, layer: int) -> mx.array:
        return self.v_codec.decode(self.v[layer])

    def commit(self, n: int) -> None:
        """Nothing to do: the caller adopts the returned buffers (KVCache.take_step)."""


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
    v = v or "fp16"
    v_codec = {"fp16": Float16Codec, "fp32": Float32Codec}[v](head_dim) \
        if v in ("fp16", "fp32") else TurboValueCodec(head_dim, v)
    return TurboKeyCodec(head_dim, kv, score_path), v_codec


def make_cache(kv: str = "fp32", *, n_layers: int, n_kv_heads: int, head_dim: int,
               v: str | None = None, k_window: int = 0, score_path: str = "int8_codebook",
               sync: Callable[[mx.array], mx.array] | None = None) -> KVCache:
    """A fresh MLX KV cache; the same types and options as :func:`quantref.cache.make_cache`."""
    turbo = check_options(kv, v, k_window, score_path)
    k_codec, v_codec = _codecs(kv, head_dim, v, score_path)
    return KVCache(k_codec, v_codec, n_layers=n_layers, n_kv_heads=n_kv_heads,
                   head_dim=head_dim, k_window=k_window if turbo else 0, kind=kv, sync=sync)
