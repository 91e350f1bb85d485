"""A decode step in few, fused kernels: the same graph as :meth:`Model.forward` for one token,
written as five custom CUDA kernels per layer instead of ~17 MLX operations.

Why: a decode step of a model this small is bound by how many kernels it launches, not by the
bytes it reads (``docs/benchmarks.md``: ~520 kernels per token at 3-6 us each on MLX's CUDA
backend, against 0.2 ms to stream the float32 weights). Per layer this step runs

1. ``norm_qkv_rope``: RMSNorm, the fused Q|K|V matrix-vector product and RoPE, giving q
   (float32) and this token's k, v (in the cache's dtype);
2. ``attend``: the query against every cached key and this token's, softmax and values, online
   (one pass, any context length; long contexts split among several blocks per head and merged
   by ``attend_merge``); grouped-query heads read their shared KV head. It also writes this
   token's k and v into the cache's buffers, in place (the decoder owns them);
3. ``matvec_add``: the output projection plus the residual;
4. ``norm_gate_up_swiglu``: RMSNorm, the fused gate|up product and SwiGLU;
5. ``matvec_add``: the down projection plus the residual,

then the final RMSNorm with the logits (``norm_matvec``) and the sampler: 153 kernels a token at
context 128 (183 past 512 tokens, with the merges), against ~520 for the plain graph. One
evaluation per token, as everywhere.

Scope: CUDA only (these are ``mx.fast.cuda_kernel`` sources; on Metal and the CPU the plain
graph runs), float weights (the CUDA default layout), fp32 / fp16 caches without a k-window.
:func:`supported` says whether a model and cache qualify; :class:`quantref_mlx.generate.Decoder`
uses this step where they do. The arithmetic is the plain graph's, in float32, in another
order (a warp's partial sums, RMSNorm's factor applied after the dot product, an online
softmax): ``bench/fused_decode_check.py`` compares the logits with the NumPy oracle's on the GPU
(within 4e-6 of the largest logit with an fp32 cache, as close as the plain graph).
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

if TYPE_CHECKING:
    from .cache import KVCache
    from .model import Model

__all__ = ["FusedStep", "position", "supported"]

WARP = 32
ATTEND_WARPS = 16  # warps per query head in ``attend``: keys are split among them
ATTEND_UNROLL = 4  # keys a warp loads at once
ATTEND_SPLIT_KEYS = 256  # cache capacity per attention block of a head ...
ATTEND_MAX_SPLITS = 16  # ... up to this many blocks per head
ROWS_THREADS = 128  # threads per block in the matrix-vector kernels (one warp per output unit)

_HEADER = r"""
__device__ __forceinline__ float fd_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
template <typename T> __device__ __forceinline__ float fd_f(T v) { return static_cast<float>(v); }
template <typename T> __device__ __forceinline__ void fd_store(T* p, float v) { *p = static_cast<T>(v); }
/* four consecutive elements as floats: one 16-byte load for float32 */
template <typename T> __device__ __forceinline__ float4 fd_load4(const T* p) {
    if constexpr (sizeof(T) == 4) {
        return *reinterpret_cast<const float4*>(p);
    } else {
        return make_float4(fd_f(p[0]), fd_f(p[1]), fd_f(p[2]), fd_f(p[3]));
    }
}
/* Rows r0 and r1 of W [*, IN] times x [IN], summed across the warp (every lane gets the
   sums), in one pass over x: with nw given, x is taken times nw elementwise and *ss receives
   sum(x^2) for RMSNorm, whose 1 / sqrt(mean + eps) then scales the sums (the same product as
   normalizing first, in another order). The loop has a constant trip count, so every load of
   a lane is issued before the first one returns: this kernel is bound by memory latency. */
template <int IN, int NROWS, typename WT>
__device__ __forceinline__ void fd_rows_dot(const WT* w, int r0, int r1, const float* x,
                                            const float* nw, float* y, float* ss, int lane) {
    const WT* w0 = w + (size_t)r0 * IN;
    const WT* w1 = w + (size_t)r1 * IN;
    float a0 = 0.0f, a1 = 0.0f, sq = 0.0f;
#pragma unroll
    for (int i = 4 * lane; i < IN; i += 128) {
        float4 b = *reinterpret_cast<const float4*>(x + i);
        if (nw != nullptr) {
            sq += b.x * b.x + b.y * b.y + b.z * b.z + b.w * b.w;
            const float4 g = *reinterpret_cast<const float4*>(nw + i);
            b.x *= g.x; b.y *= g.y; b.z *= g.z; b.w *= g.w;
        }
        const float4 c0 = fd_load4(w0 + i);
        a0 += c0.x * b.x + c0.y * b.y + c0.z * b.z + c0.w * b.w;
        if (NROWS == 2) {
            const float4 c1 = fd_load4(w1 + i);
            a1 += c1.x * b.x + c1.y * b.y + c1.z * b.z + c1.w * b.w;
        }
    }
    y[0] = fd_sum(a0);
    if (NROWS == 2) y[1] = fd_sum(a1);
    if (nw != nullptr) *ss = fd_sum(sq);
}
/* Write through a pointer MLX hands over as an input (see _ATTEND: the cache's buffers). */
template <typename T> __device__ __forceinline__ void fd_poke(const T* p, T v) {
    *const_cast<T*>(p) = v;
}
__device__ __forceinline__ float fd_inv_rms(float ss, int n, float eps) {
    return rsqrtf(ss / (float)n + eps);
}
"""

# One warp per output unit. Inputs: x float32 [IN], nw float32 [IN] (the norm's weight),
# w [ROWS, IN], eps float32 [1]; template IN, UNITS.
_PRELUDE = """
    const int unit = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    const int lane = (int)(threadIdx.x & 31);
    if (unit >= UNITS) return;
"""

# Logits: RMSNorm then W x. Output out float32 [UNITS].
_NORM_MATVEC = _PRELUDE + """
    float y[2], ss;
    fd_rows_dot<IN, 1>(w, unit, unit, x, nw, y, &ss, lane);
    if (lane == 0) out[unit] = y[0] * fd_inv_rms(ss, IN, FD_EPS);
"""

# Residual: out = r + W x (no norm). Inputs x [IN], w [UNITS, IN], r float32 [UNITS].
_MATVEC_ADD = _PRELUDE + """
    float y[2];
    fd_rows_dot<IN, 1>(w, unit, unit, x, (const float*)nullptr, y, (float*)nullptr, lane);
    if (lane == 0) out[unit] = r[unit] + y[0];
"""

# SwiGLU: unit u is gate row u and up row UNITS + u; out float32 [UNITS] = silu(g) * u.
_NORM_GATE_UP_SWIGLU = _PRELUDE + """
    float y[2], ss;
    fd_rows_dot<IN, 2>(w, unit, UNITS + unit, x, nw, y, &ss, lane);
    if (lane != 0) return;
    const float inv = fd_inv_rms(ss, IN, FD_EPS);
    const float g = y[0] * inv;
    out[unit] = g / (1.0f + expf(-g)) * (y[1] * inv);
"""

# Q|K|V with RoPE: unit p is rows 2p and 2p + 1, an adjacent pair (GGUF Llama's RoPE form).
# Extra inputs: pos int32 [4] (this token's position, in pos[0]), inv_freq float32 [HD / 2] (0 past the
# rotated dimensions: the identity). Outputs q float32 [Q_ROWS], kv [KV_ROWS] in the cache's
# dtype (k then v). Template HD, Q_ROWS (n_heads * head_dim), QK_ROWS (the rows RoPE turns).
_NORM_QKV_ROPE = _PRELUDE + """
    const int r0 = 2 * unit;
    float y[2], ss;
    fd_rows_dot<IN, 2>(w, r0, r0 + 1, x, nw, y, &ss, lane);
    if (lane != 0) return;
    const float inv = fd_inv_rms(ss, IN, FD_EPS);
    float y0 = y[0] * inv;
    float y1 = y[1] * inv;
    if (r0 < QK_ROWS) {
        const float theta = (float)pos[0] * inv_freq[(r0 % HD) / 2];
        float s, c;
        sincosf(theta, &s, &c);
        const float a = y0 * c - y1 * s;
        y1 = y0 * s + y1 * c;
        y0 = a;
    }
    if (r0 < Q_ROWS) {
        q[r0] = y0;
        q[r0 + 1] = y1;
    } else {
        fd_store(kv + (r0 - Q_ROWS), y0);
        fd_store(kv + (r0 - Q_ROWS + 1), y1);
    }
"""

# Decode attention, one block of NW warps per query head. Inputs q float32 [NH * HD], kv
# [2 * NKV * HD] (this token's k then v, in the cache's dtype), kc / vc [NKV, CAP, HD] (the
# cache's buffers, positions < pos filled), pos int32 [4] (in pos[0]). Output out float32
# [NH * HD]. Each warp keeps an online softmax over its keys (t = warp, warp + NW, ...), U keys
# at a time so that their loads are in flight together; the warps' partial results merge at
# the end. This token's k and v are read from kv, and the first query head of each KV group
# writes them into kc / vc at pos: in place, which is what a slice update of a buffer the
# decoder owns does (donated), without its two extra kernels per buffer and layer.
_ATTEND = """
    const int S = (int)gridDim.x / NH;  /* splits per head: a launch parameter, not a template
                                            one, so that a new capacity compiles nothing */
    const int h = (int)blockIdx.x / S;
    const int split = (int)blockIdx.x % S;
    const int g = h / (NH / NKV);
    const int warp = (int)(threadIdx.x >> 5);
    const int lane = (int)(threadIdx.x & 31);
    const int L = pos[0] + 1;
    const int chunk = (L + S - 1) / S;
    const int lo = split * chunk;
    const int hi = min(L, lo + chunk);
    const int cap = kc_shape[1];
    const float NEG_INF = __int_as_float(0xff800000);
    __shared__ float sm_m[NW];
    __shared__ float sm_l[NW];
    __shared__ float sm_acc[NW * HD];
    if (split == 0 && h % (NH / NKV) == 0 && (int)threadIdx.x < HD) {
        const size_t at = ((size_t)g * cap + (L - 1)) * HD + threadIdx.x;
        fd_poke(kc + at, kv[g * HD + threadIdx.x]);
        fd_poke(vc + at, kv[(NKV + g) * HD + threadIdx.x]);
    }
    float qv[DPL];
    float acc[DPL];
#pragma unroll
    for (int d = 0; d < DPL; ++d) {
        qv[d] = q[h * HD + lane * DPL + d] * FD_SCALE;
        acc[d] = 0.0f;
    }
    float m = NEG_INF;
    float l = 0.0f;
    const size_t base = (size_t)g * cap * HD + lane * DPL;
    for (int t0 = lo + warp; t0 < hi; t0 += NW * U) {
        float s[U];
        float vv[U][DPL];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = t0 + u * NW;
            s[u] = 0.0f;
            if (t < hi) {  /* uniform across the warp */
                const bool last = t == L - 1;  /* this token: from kv, not yet in the cache */
                const auto* kp = last ? kv + g * HD + lane * DPL : kc + base + (size_t)t * HD;
                const auto* vp = last ? kv + (NKV + g) * HD + lane * DPL
                                      : vc + base + (size_t)t * HD;
#pragma unroll
                for (int d = 0; d < DPL; ++d) {
                    s[u] += qv[d] * fd_f(kp[d]);
                    vv[u][d] = fd_f(vp[d]);
                }
            }
        }
        float mn = m;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            s[u] = fd_sum(s[u]);
            if (t0 + u * NW < hi) mn = fmaxf(mn, s[u]);
        }
        const float c = expf(m - mn);  /* 0 on a warp's first keys (m = -inf) */
        l *= c;
#pragma unroll
        for (int d = 0; d < DPL; ++d) acc[d] *= c;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (t0 + u * NW < hi) {
                const float p = expf(s[u] - mn);
                l += p;
#pragma unroll
                for (int d = 0; d < DPL; ++d) acc[d] += p * vv[u][d];
            }
        }
        m = mn;
    }
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int d = 0; d < DPL; ++d) sm_acc[warp * HD + lane * DPL + d] = acc[d];
    __syncthreads();
    if ((int)threadIdx.x < HD) {
        float M = NEG_INF;
        for (int w = 0; w < NW; ++w) M = fmaxf(M, sm_m[w]);
        float total = 0.0f;
        float o = 0.0f;
        for (int w = 0; w < NW; ++w) {
            if (sm_m[w] == NEG_INF) continue;  /* a warp that had no key */
            const float e = expf(sm_m[w] - M);
            total += sm_l[w] * e;
            o += sm_acc[w * HD + threadIdx.x] * e;
        }
        if (S == 1) {
            out[h * HD + threadIdx.x] = o / total;
        } else {  /* this split's partial result: sum, then its max and total */
            float* part = out + (size_t)blockIdx.x * (HD + 2);
            part[threadIdx.x] = o;
            if (threadIdx.x == 0) {
                part[HD] = M;
                part[HD + 1] = total;
            }
        }
    }
"""

# The S partial results of each query head (``_ATTEND`` with S > 1: [NH * S, HD + 2], a split's
# unnormalized sum, its max and its total) merged: out float32 [NH * HD]. One block per head.
_ATTEND_MERGE = """
    const int h = (int)blockIdx.x;
    const int d = (int)threadIdx.x;
    const int S = (int)(part_shape[0] / ((int)gridDim.x * (HD + 2)));
    const float NEG_INF = __int_as_float(0xff800000);
    const float* p = part + (size_t)h * S * (HD + 2);
    float M = NEG_INF;
    for (int s = 0; s < S; ++s) M = fmaxf(M, p[s * (HD + 2) + HD]);
    float total = 0.0f;
    float o = 0.0f;
    for (int s = 0; s < S; ++s) {
        const float m = p[s * (HD + 2) + HD];
        if (m == NEG_INF) continue;  /* a split that had no key */
        const float e = expf(m - M);
        total += p[s * (HD + 2) + HD + 1] * e;
        o += p[s * (HD + 2) + d] * e;
    }
    out[h * HD + d] = o / total;
"""

_KERNELS = {
    "norm_matvec": (_NORM_MATVEC, ["x", "nw", "w"], ["out"]),
    "matvec_add": (_MATVEC_ADD, ["x", "w", "r"], ["out"]),
    "norm_gate_up_swiglu": (_NORM_GATE_UP_SWIGLU, ["x", "nw", "w"], ["out"]),
    "norm_qkv_rope": (_NORM_QKV_ROPE, ["x", "nw", "w", "pos", "inv_freq"], ["q", "kv"]),
    "attend": (_ATTEND, ["q", "kv", "kc", "vc", "pos"], ["out"]),
    "attend_merge": (_ATTEND_MERGE, ["part"], ["out"]),
}


@lru_cache(maxsize=None)
def _kernel(which: str, eps: float, scale: float):
    """The kernel ``which``, with RMSNorm's epsilon and the attention scale compiled in.

    Constants, not inputs: MLX on CUDA keeps arrays under 8 bytes in one small pool of managed
    memory, which the host touches on every token (it reads the sampled id back), so a kernel
    that reads a scalar input waits for that memory to migrate back to the GPU: ~20 us, more
    than the kernel itself (measured with ncu). For the same reason the position is a 4-element
    array (:class:`FusedStep`).
    """
    source, inputs, outputs = _KERNELS[which]
    header = _constants(eps, scale) + _HEADER
    digest = hashlib.sha256((header + source).encode()).hexdigest()[:12]
    return mx.fast.cuda_kernel(name=f"fused_{which}_{digest}", input_names=inputs,
                               output_names=outputs, source=source, header=header)


def _constants(eps: float, scale: float) -> str:
    """``#define`` lines for the kernels' constants, as exact hexadecimal float32 literals."""
    return (f"#define FD_EPS {float(np.float32(eps)).hex()}f\n"
            f"#define FD_SCALE {float(np.float32(scale)).hex()}f\n")


def _rows_launch(units: int) -> dict:
    return {"grid": (units * WARP, 1, 1), "threadgroup": (ROWS_THREADS, 1, 1)}


def supported(model: "Model", cache: "KVCache") -> str | None:
    """None when the fused step can run ``model`` with ``cache``; else the reason it cannot."""
    from .model import on_gpu

    a, w = model.args, model.weights
    if model.sync != "step":
        return "per-op sync"
    if not (cache.k_codec.plain and cache.v_codec.plain) or cache.k_window:
        return f"cache {cache.kind} (fp32 / fp16 without a k-window only)"
    if cache.length == 0:
        return "an empty cache (prefill first)"
    lins = [w.output, w.token_embd] + [m for lw in w.layers for m in lw.linears]
    if any(lin.bits for lin in lins):
        return "quantized weights (float weights only)"
    if any(lw.wqkv.whole is None or lw.w_gate_up.whole is None for lw in w.layers):
        return "unfused projections"
    if (a.dim % 4 or a.hidden_dim % 4 or (a.n_heads * a.head_dim) % 4 or a.head_dim % WARP
            or a.head_dim > ATTEND_WARPS * WARP or a.n_heads % a.n_kv_heads or a.rope_dim % 2):
        return "shapes the kernels do not cover"
    cuda = getattr(mx, "cuda", None)
    if not (on_gpu() and cuda is not None and cuda.is_available()):
        return "not on a CUDA GPU"
    return None


class FusedStep:
    """One decoded token as fused kernels: ``step(token [1], pos int32 [4], k, v) ->
    (logits [1, vocab], k, v)`` where ``k``, ``v`` are the cache's per-layer buffers
    (:meth:`KVCache.take_buffers`), returned updated. Pure graph building: no evaluation."""

    def __init__(self, model: "Model"):
        a, w = model.args, model.weights
        self.args, self.weights = a, w
        self.consts = (a.norm_eps, 1.0 / math.sqrt(a.head_dim))
        self.inv_freq = mx.array(_inv_freq(a, None if w.rope_freqs is None
                                           else np.array(w.rope_freqs)))

    def __call__(self, token: mx.array, pos: mx.array, k: list, v: list):
        a, w = self.args, self.weights
        x = w.token_embd.rows(token.reshape(1)).reshape(a.dim)  # [dim]
        for layer, lw in enumerate(w.layers):
            (kbuf,), (vbuf,) = k[layer], v[layer]  # [n_kv_heads, capacity, head_dim]
            q, kv = self.norm_qkv_rope(x, lw, pos, kbuf.dtype)  # [n_heads*hd], [2*n_kv*hd]
            x = self.matvec_add(self.attend(q, kv, kbuf, vbuf, pos), lw.wo.weight, x)
            x = self.matvec_add(self.norm_gate_up_swiglu(x, lw), lw.w_down.weight, x)
        return self.norm_matvec(x, w.output_norm, w.output.weight).reshape(1, -1), k, v

    # One kernel each ------------------------------------------------------------------------
    def norm_qkv_rope(self, x: mx.array, lw, pos: mx.array, kv_dtype) -> tuple[mx.array, mx.array]:
        """``x [dim]`` -> q ``float32 [n_heads * head_dim]`` and k|v ``[2 * n_kv_heads *
        head_dim]`` in ``kv_dtype``, RoPE applied to q and k at position ``pos``."""
        a = self.args
        q_rows, kv_rows = a.n_heads * a.head_dim, 2 * a.n_kv_heads * a.head_dim
        units = (q_rows + kv_rows) // 2
        return _kernel("norm_qkv_rope", *self.consts)(
            inputs=[x, lw.attn_norm, lw.wqkv.whole.weight, pos, self.inv_freq],
            template=[("IN", a.dim), ("UNITS", units), ("HD", a.head_dim), ("Q_ROWS", q_rows),
                      ("QK_ROWS", q_rows + kv_rows // 2)],
            output_shapes=[(q_rows,), (kv_rows,)], output_dtypes=[mx.float32, kv_dtype],
            **_rows_launch(units))

    def attend(self, q: mx.array, kv: mx.array, kbuf: mx.array, vbuf: mx.array, pos: mx.array,
               warps: int = ATTEND_WARPS, unroll: int = ATTEND_UNROLL) -> mx.array:
        """``q [n_heads * head_dim]`` against the cached keys and values ``[n_kv_heads,
        capacity, head_dim]`` at positions ``0 .. pos - 1`` and this token's ``kv [2 *
        n_kv_heads * head_dim]`` at ``pos`` -> ``float32 [n_heads * head_dim]``. Writes ``kv``
        into the buffers at ``pos``, in place (see ``_ATTEND``): the caller owns them.

        Long contexts are split among several blocks per head (one per ATTEND_SPLIT_KEYS of
        capacity, at most ATTEND_MAX_SPLITS), whose partial softmaxes a second kernel merges:
        one block per head would leave most of the GPU idle while it walks 4k keys."""
        a = self.args
        hd, nh = a.head_dim, a.n_heads
        splits = max(1, min(ATTEND_MAX_SPLITS, kbuf.shape[1] // ATTEND_SPLIT_KEYS))
        (out,) = _kernel("attend", *self.consts)(
            inputs=[q, kv, kbuf, vbuf, pos],
            template=[("NH", nh), ("NKV", a.n_kv_heads), ("HD", hd), ("DPL", hd // WARP),
                      ("NW", warps), ("U", unroll)],
            output_shapes=[(nh * hd,) if splits == 1 else (nh * splits * (hd + 2),)],
            output_dtypes=[mx.float32],
            grid=(nh * splits * warps * WARP, 1, 1), threadgroup=(warps * WARP, 1, 1))
        if splits == 1:
            return out
        (out,) = _kernel("attend_merge", *self.consts)(
            inputs=[out], template=[("HD", hd)], output_shapes=[(nh * hd,)],
            output_dtypes=[mx.float32], grid=(nh * hd, 1, 1), threadgroup=(hd, 1, 1))
        return out

    def matvec_add(self, x: mx.array, weight: mx.array, r: mx.array) -> mx.array:
        """``r + weight @ x``: ``x [in]``, ``weight [out, in]``, ``r [out]`` -> ``[out]``."""
        return self._rows("matvec_add", [x, weight, r], *weight.shape)

    def norm_gate_up_swiglu(self, x: mx.array, lw) -> mx.array:
        """``x [dim]`` -> ``silu(gate) * up``, ``float32 [hidden_dim]``."""
        return self._rows("norm_gate_up_swiglu", [x, lw.ffn_norm, lw.w_gate_up.whole.weight],
                          self.args.hidden_dim, self.args.dim)

    def norm_matvec(self, x: mx.array, norm: mx.array, weight: mx.array) -> mx.array:
        """``weight @ rms_norm(x)``: ``x [in]`` -> ``float32 [out]`` (the logits)."""
        return self._rows("norm_matvec", [x, norm, weight], *weight.shape)

    def _rows(self, which: str, inputs: list, units: int, n_in: int) -> mx.array:
        """A one-output matrix-vector kernel: ``units`` output floats, one warp each."""
        (out,) = _kernel(which, *self.consts)(
            inputs=inputs, template=[("IN", n_in), ("UNITS", units)],
            output_shapes=[(units,)], output_dtypes=[mx.float32], **_rows_launch(units))
        return out


def position(n: int) -> mx.array:
    """The position input of :class:`FusedStep`: ``int32 [4]``, every element ``n``. Four, not
    one: see :func:`_kernel` on scalars. Advance it on the device, ``pos + position(1)``
    (``pos + 1`` would read the 1 from that pool), rather than building one each token."""
    return mx.array(np.full(4, n, np.int32))


def _inv_freq(a, rope_freqs: np.ndarray | None) -> np.ndarray:
    """``float32 [head_dim / 2]``: the angle per position of each adjacent pair of a head, as
    :func:`quantref_mlx.model.rope` turns it (``rope_freqs`` divides, ``rope_scale`` divides the
    position); 0 for pairs past ``rope_dim``, which RoPE leaves alone."""
    half = a.rope_dim // 2
    freqs = a.rope_base ** (-np.arange(0, a.rope_dim, 2, dtype=np.float64) / a.rope_dim)
    if rope_freqs is not None:
        freqs = freqs / np.asarray(rope_freqs, np.float64)[:half]
    out = np.zeros(a.head_dim // 2, np.float64)
    out[:half] = freqs / a.rope_scale
    return out.astype(np.float32)
