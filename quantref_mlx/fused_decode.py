"""A decode step in few, fused kernels: the same graph as :meth:`Model.forward` for one token,
written as three custom CUDA kernels per layer instead of ~17 MLX operations.

Why: a decode step of a model this small is bound by how many kernels it launches, not by the
bytes it reads (``docs/benchmarks.md``: ~520 kernels per token for the plain graph, and MLX's
CUDA backend spends ~4 us on each kernel of a dependent chain however little it does). Per
layer this step runs

1. ``norm_qkv_rope``: RMSNorm, the fused Q|K|V matrix-vector product and RoPE, giving q
   (float32) and this token's k, v (in the cache's dtype);
2. ``attend_project``: per query head, the query against every cached key and this token's,
   softmax and values, online (one pass, any context length), then that head's share of the
   output projection; the last block to finish sums the heads' shares (in head order) with
   the residual. Grouped-query heads read their shared KV head. It also writes this token's k
   and v into the cache's buffers, in place (the decoder owns them). Past 256 tokens of
   capacity a head's keys are split among several blocks (``attend_split``), merged and
   projected by ``attend_merge_project``: one more kernel;
3. ``ffn``: RMSNorm, the fused gate|up product and SwiGLU for a slice of the hidden units per
   block, then that slice's share of the down projection, summed as in 2 with the residual,

then the final RMSNorm with the logits (``norm_matvec``) and the sampler: ~95 kernels a token
at context 128 (30 more past 256 tokens, with the merges), against ~520 for the plain graph.
One evaluation per token, as everywhere. A product split among blocks is summed by the block
that finishes last, in a fixed order, never by atomic adds: the step is deterministic.

Weights: float (float32 or float16), or quantized as MLX keeps a GGUF's Q4_0 / Q4_1 / Q8_0
tensors (4 or 8 bits, groups of 32, float32 scales and biases): the kernels read the packed
codes and dequantize each weight in registers to exactly the oracle's float32 value, so a
quantized model streams ~5-6x fewer bytes a token (the embedding row is one more kernel).

Scope: CUDA only (these are ``mx.fast.cuda_kernel`` sources; on Metal and the CPU the plain
graph runs), fp32 / fp16 caches without a k-window.
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
    from .model import Linear, Model

__all__ = ["FusedStep", "position", "supported"]

WARP = 32
ATTEND_WARPS = 16  # warps per query head in ``attend``: keys are split among them
ATTEND_UNROLL = 4  # keys a warp loads at once
ATTEND_SPLIT_KEYS = 256  # cache capacity per attention block of a head ...
ATTEND_MAX_SPLITS = 16  # ... up to this many blocks per head
ROWS_THREADS = 128  # threads per block in the matrix-vector kernels (one warp per output unit)
FFN_UNITS = 32  # hidden units per block of ``ffn`` (a whole group of the down projection's)
FFN_WARPS = 16  # warps per block of ``ffn``

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
/* x [IN] (times nw elementwise when nw is given, *ss receiving sum(x^2)), EPW elements at i,
   into v[EPW]. */
template <int EPW>
__device__ __forceinline__ void fd_x(const float* x, const float* nw, int i, float* v, float* sq) {
#pragma unroll
    for (int e = 0; e < EPW; e += 4) {
        float4 b = *reinterpret_cast<const float4*>(x + i + e);
        if (nw != nullptr) {
            *sq += b.x * b.x + b.y * b.y + b.z * b.z + b.w * b.w;
            const float4 g = *reinterpret_cast<const float4*>(nw + i + e);
            b.x *= g.x; b.y *= g.y; b.z *= g.z; b.w *= g.w;
        }
        v[e] = b.x; v[e + 1] = b.y; v[e + 2] = b.z; v[e + 3] = b.w;
    }
}
/* Code e (0 .. 32 / BITS - 1) of a packed word, as a float. */
template <int BITS> __device__ __forceinline__ float fd_code(uint32_t word, int e) {
    return (float)((word >> (BITS * e)) & ((1u << BITS) - 1u));
}
/* Row r of W [*, IN] dotted with v: the EPW elements at i. BITS 0: W is float (float32 or
   float16); BITS 4 or 8: W is MLX's packed uint32 codes [*, IN * BITS / 32] (word i / EPW holds
   elements i .. i + EPW - 1, the first in the low bits) with float32 scales and biases
   [*, IN / 32], and each weight is scale * code + bias, exactly the dequantized float32 value
   (the product is exact: a float16 scale times a code of at most 8 bits). */
template <int IN, int BITS, int EPW, typename WT>
__device__ __forceinline__ float fd_dot(const WT* w, const float* sc, const float* bi, int r,
                                        int i, const float* v) {
    float a = 0.0f;
    if constexpr (BITS == 0) {
        const float4 c = fd_load4(w + (size_t)r * IN + i);
        a = c.x * v[0] + c.y * v[1] + c.z * v[2] + c.w * v[3];
    } else {
        const uint32_t code = w[(size_t)r * (IN / EPW) + i / EPW];
        const float s = sc[(size_t)r * (IN / 32) + i / 32];
        const float b = bi[(size_t)r * (IN / 32) + i / 32];
#pragma unroll
        for (int e = 0; e < EPW; ++e) a += fmaf(s, fd_code<BITS>(code, e), b) * v[e];
    }
    return a;
}
/* Element (r, i) of W [*, IN] (a weight as in fd_dot) as float32. */
template <int IN, int BITS, typename WT>
__device__ __forceinline__ float fd_weight(const WT* w, const float* sc, const float* bi,
                                           size_t r, int i) {
    if constexpr (BITS == 0) {
        return fd_f(w[r * IN + i]);
    } else {
        constexpr int EPW = 32 / BITS;
        const float q = fd_code<BITS>(w[r * (IN / EPW) + i / EPW], i % EPW);
        return fmaf(sc[r * (IN / 32) + i / 32], q, bi[r * (IN / 32) + i / 32]);
    }
}
/* Rows r0 and r1 of W [*, IN] times x [IN], summed across the warp (every lane gets the
   sums), in one pass over x: with nw given, x is taken times nw elementwise and *ss receives
   sum(x^2) for RMSNorm, whose 1 / sqrt(mean + eps) then scales the sums (the same product as
   normalizing first, in another order). A lane takes EPW consecutive elements at a time (4
   floats, or one packed word); the loop has a constant trip count, so every load of a lane is
   issued before the first one returns: this kernel is bound by memory latency. */
template <int IN, int NROWS, int BITS, typename WT>
__device__ __forceinline__ void fd_rows_dot(const WT* w, const float* sc, const float* bi,
                                            int r0, int r1, const float* x, const float* nw,
                                            float* y, float* ss, int lane) {
    constexpr int EPW = BITS == 0 ? 4 : 32 / BITS;
    float a0 = 0.0f, a1 = 0.0f, sq = 0.0f;
#pragma unroll
    for (int i = EPW * lane; i < IN; i += 32 * EPW) {
        float v[EPW];
        fd_x<EPW>(x, nw, i, v, &sq);
        a0 += fd_dot<IN, BITS, EPW>(w, sc, bi, r0, i, v);
        if (NROWS == 2) a1 += fd_dot<IN, BITS, EPW>(w, sc, bi, r1, i, v);
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
/* A matrix-vector product split by columns among the blocks of a launch, with its residual,
   finished by the block that ends last: this block's columns c0 .. c0 + NCOLS - 1 of W [OUT, IN]
   (a weight as in fd_dot) times v [NCOLS] (shared memory) go to part[slot] [OUT] of the
   scratch buffer part [NSLOTS * OUT + 4], then a counter (uint32) in element NSLOTS * OUT; the last
   of the NSLOTS blocks to count itself there writes out = r + the sum of every slot's part,
   in slot order, so that the result does not depend on which block finished when (the
   "threadFenceReduction" pattern of CUDA's samples), and sets *counter back to 0 for the next
   launch. No block waits for another, so any number of blocks may run. The scratch buffer is
   the step's own, written in place (one input, not two: each input of a kernel costs MLX host
   time on every launch). Called by every thread of the block. */
template <int OUT, int IN, int NCOLS, int NSLOTS, int BITS, typename WT>
__device__ void fd_project(const WT* w, const float* sc, const float* bi, int c0, const float* v,
                           int slot, const float* part, const float* r, float* out) {
    uint32_t* counter = reinterpret_cast<uint32_t*>(const_cast<float*>(part) + NSLOTS * OUT);
    constexpr int EPW = BITS == 0 ? 4 : 32 / BITS;
    float* mine = const_cast<float*>(part) + (size_t)slot * OUT;
    for (int row = (int)threadIdx.x; row < OUT; row += (int)blockDim.x) {
        float a = 0.0f;
#pragma unroll
        for (int i = 0; i < NCOLS; i += EPW) a += fd_dot<IN, BITS, EPW>(w, sc, bi, row, c0 + i, v + i);
        mine[row] = a;
    }
    __shared__ bool fd_last;
    __threadfence();  /* this block's part is visible to all before the block counts itself */
    __syncthreads();
    if (threadIdx.x == 0) {
        fd_last = atomicAdd(counter, 1u) == (uint32_t)(NSLOTS - 1);
    }
    __syncthreads();
    if (!fd_last) return;
    __threadfence();
    for (int row = (int)threadIdx.x; row < OUT; row += (int)blockDim.x) {
        float a = 0.0f;
#pragma unroll  /* every load in flight at once: a loop of dependent loads would take ~0.4 us
                   a slot */
        for (int s = 0; s < NSLOTS; ++s) a += __ldcg(part + (size_t)s * OUT + row);  /* from L2 */
        out[row] = r[row] + a;
    }
    if (threadIdx.x == 0) *counter = 0u;
}
"""

# One warp per output unit. Inputs: x float32 [IN], nw float32 [IN] (the norm's weight), the
# weight w [ROWS, IN] (with scales, biases when quantized: see fd_dot); template IN, UNITS,
# BITS (0: a float weight).
_PRELUDE = """
    const int unit = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    const int lane = (int)(threadIdx.x & 31);
    if (unit >= UNITS) return;
"""

# Logits: RMSNorm then W x. Output out float32 [UNITS].
_NORM_MATVEC = _PRELUDE + """
    float y[2], ss;
    fd_rows_dot<IN, 1, BITS>(w, FD_QUANT, unit, unit, x, nw, y, &ss, lane);
    if (lane == 0) out[unit] = y[0] * fd_inv_rms(ss, IN, FD_EPS);
"""

# The feed-forward half of a layer: out = x + W2 (silu(g) * u), with g, u the gate and up rows
# of W times RMSNorm(x). Block b takes hidden units b * SL .. b * SL + SL - 1 (unit u: gate row
# u, up row H + u), one warp per unit at a time, then its SL columns of the down projection W2
# [IN, H] (fd_project; scratch part [H / SL * IN + 4]). Inputs x float32 [IN], nw [IN],
# w (gate|up [2H, IN]), w2; template IN, H, SL, BITS, BITS2.
_FFN = """
    const int warp = (int)(threadIdx.x >> 5);
    const int lane = (int)(threadIdx.x & 31);
    __shared__ float sm_h[SL];
    for (int u = warp; u < SL; u += (int)(blockDim.x >> 5)) {
        const int unit = (int)blockIdx.x * SL + u;
        float y[2], ss;
        fd_rows_dot<IN, 2, BITS>(w, FD_QUANT, unit, H + unit, x, nw, y, &ss, lane);
        if (lane == 0) {
            const float inv = fd_inv_rms(ss, IN, FD_EPS);
            const float g = y[0] * inv;
            sm_h[u] = g / (1.0f + expf(-g)) * (y[1] * inv);
        }
    }
    __syncthreads();
    fd_project<IN, H, SL, H / SL, BITS2>(w2, FD_QUANT2, (int)blockIdx.x * SL, sm_h,
                                         (int)blockIdx.x, part, x, out);
"""

# Q|K|V with RoPE: unit p is rows 2p and 2p + 1, an adjacent pair (GGUF Llama's RoPE form).
# Extra inputs: pos int32 [4] (this token's position, in pos[0]), inv_freq float32 [HD / 2] (0 past the
# rotated dimensions: the identity). Outputs q float32 [Q_ROWS], kv [KV_ROWS] in the cache's
# dtype (k then v). Template HD, Q_ROWS (n_heads * head_dim), QK_ROWS (the rows RoPE turns).
_NORM_QKV_ROPE = _PRELUDE + """
    const int r0 = 2 * unit;
    float y[2], ss;
    fd_rows_dot<IN, 2, BITS>(w, FD_QUANT, r0, r0 + 1, x, nw, y, &ss, lane);
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
        FD_ATTEND_STORE
    }
    FD_ATTEND_AFTER
"""

# The head's output o [HD], then the output projection and residual: out = r + W o over all
# heads, W [DIM, NH * HD] the weight w (fd_project: scratch part [NH * DIM + 4]).
_PROJECT_HEADS = """
    __syncthreads();
    fd_project<DIM, NH * HD, HD, NH, BITS>(w, FD_QUANT, h * HD, sm_o, h, part, r, out);
"""

# One block per head (S = 1), projected: out float32 [DIM] (extra inputs w, r, part).
_ATTEND_PROJECT = ("    __shared__ float sm_o[HD];\n" + _ATTEND
                   .replace("FD_ATTEND_STORE", "sm_o[threadIdx.x] = o / total;")
                   .replace("FD_ATTEND_AFTER", _PROJECT_HEADS))

# S blocks per head: each writes its split's unnormalized sum, max and total, out float32
# [NH * S, HD + 2], for _ATTEND_MERGE_PROJECT.
_ATTEND_SPLIT = (_ATTEND.replace("FD_ATTEND_STORE", """float* mine = out + (size_t)blockIdx.x * (HD + 2);
        mine[threadIdx.x] = o;
        if (threadIdx.x == 0) {
            mine[HD] = M;
            mine[HD + 1] = total;
        }""").replace("FD_ATTEND_AFTER", ""))

# The S partial results of each query head (splits [NH * S, HD + 2]) merged, then projected as
# in _ATTEND_PROJECT: out float32 [DIM]. One block per head.
_ATTEND_MERGE_PROJECT = """
    const int h = (int)blockIdx.x;
    const int d = (int)threadIdx.x;
    const int S = (int)(splits_shape[0] / ((int)gridDim.x * (HD + 2)));
    const float NEG_INF = __int_as_float(0xff800000);
    __shared__ float sm_o[HD];
    if (d < HD) {
        const float* p = splits + (size_t)h * S * (HD + 2);
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
        sm_o[d] = o / total;
    }
""" + _PROJECT_HEADS

# The embedding: row token[0] of w [*, IN] (a weight as in fd_dot) as float32, out [IN].
_EMBED = """
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= IN) return;
    out[i] = fd_weight<IN, BITS>(w, FD_QUANT, (size_t)token[0], i);
"""

# name: (source, inputs, outputs). "w" and "w2" stand for a weight's arrays: w alone for a float
# weight; w, scales, biases (w2, scales2, biases2) for a quantized one.
_KERNELS = {
    "embed": (_EMBED, ["token", "w"], ["out"]),
    "norm_matvec": (_NORM_MATVEC, ["x", "nw", "w"], ["out"]),
    "norm_qkv_rope": (_NORM_QKV_ROPE, ["x", "nw", "w", "pos", "inv_freq"], ["q", "kv"]),
    "attend_project": (_ATTEND_PROJECT, ["q", "kv", "kc", "vc", "pos", "w", "r", "part"],
                       ["out"]),
    "attend_split": (_ATTEND_SPLIT, ["q", "kv", "kc", "vc", "pos"], ["out"]),
    "attend_merge_project": (_ATTEND_MERGE_PROJECT, ["splits", "w", "r", "part"],
                             ["out"]),
    "ffn": (_FFN, ["x", "nw", "w", "w2", "part"], ["out"]),
}


@lru_cache(maxsize=None)
def _kernel(which: str, eps: float, scale: float, quantized: tuple[bool, ...] = ()):
    """The kernel ``which``, with RMSNorm's epsilon and the attention scale compiled in, for
    float or quantized weights: ``quantized[0]`` (``[1]``) says whether the inputs ``scales``
    and ``biases`` (``scales2``, ``biases2``) follow ``w`` (``w2``).

    Constants, not inputs: MLX on CUDA keeps arrays under 8 bytes in one small pool of managed
    memory, which the host touches on every token (it reads the sampled id back), so a kernel
    that reads a scalar input waits for that memory to migrate back to the GPU: ~20 us, more
    than the kernel itself (measured with ncu). For the same reason the position is a 4-element
    array (:class:`FusedStep`).
    """
    source, inputs, outputs = _KERNELS[which]
    quantized = dict(zip(("w", "w2"), quantized))
    inputs = [n for name in inputs for n in (
        [name, "scales" + name[1:], "biases" + name[1:]] if quantized.get(name) else [name])]
    header = _constants(eps, scale, quantized.get("w", False), quantized.get("w2", False))
    header += _HEADER
    digest = hashlib.sha256((header + source).encode()).hexdigest()[:12]
    return mx.fast.cuda_kernel(name=f"fused_{which}_{digest}", input_names=inputs,
                               output_names=outputs, source=source, header=header)


def _constants(eps: float, scale: float, quantized: bool, quantized2: bool = False) -> str:
    """``#define`` lines for the kernels' constants (exact hexadecimal float32 literals) and
    for the weights' scales and biases, ``FD_QUANT`` for ``w`` and ``FD_QUANT2`` for ``w2``
    (null pointers for a float weight, which has none)."""
    none = "((const float*)nullptr), ((const float*)nullptr)"
    return (f"#define FD_EPS {float(np.float32(eps)).hex()}f\n"
            f"#define FD_SCALE {float(np.float32(scale)).hex()}f\n"
            f"#define FD_QUANT {'scales, biases' if quantized else none}\n"
            f"#define FD_QUANT2 {'scales2, biases2' if quantized2 else none}\n")


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
    if any(lin.bits not in (0, 4, 8) or (lin.bits and (lin.group_size != 32 or
                                                        lin.scales.dtype != mx.float32))
           for lin in lins):
        return "quantized weights other than 4 or 8 bits in groups of 32, float32 scales"
    if any(lw.wqkv.whole is None or lw.w_gate_up.whole is None for lw in w.layers):
        return "unfused projections"
    # every input width a whole number of 32-element groups (and so of float4 loads)
    if (a.dim % 32 or a.hidden_dim % FFN_UNITS or (a.n_heads * a.head_dim) % 32 or a.head_dim % WARP
            or a.head_dim > ATTEND_WARPS * WARP or a.n_heads % a.n_kv_heads or a.rope_dim % 2):
        return "shapes the kernels do not cover"
    cuda = getattr(mx, "cuda", None)
    if not (on_gpu() and cuda is not None and cuda.is_available()):
        return "not on a CUDA GPU"
    return None


class FusedStep:
    """One decoded token as fused kernels: ``step(token [1], pos int32 [4], k, v) ->
    (logits [1, vocab], k, v)`` where ``k``, ``v`` are the cache's per-layer buffers
    (:meth:`KVCache.take_buffers`), returned updated. Pure graph building: no evaluation.

    It owns a scratch buffer per split product (``fd_project``: the blocks' partial sums and a
    counter of finished blocks), which its kernels write in place and leave ready for the next
    launch; one step's kernels run in order, each consuming the last one's output, so the
    layers share them."""

    def __init__(self, model: "Model"):
        a, w = model.args, model.weights
        self.args, self.weights = a, w
        self.consts = (a.norm_eps, 1.0 / math.sqrt(a.head_dim))
        self.inv_freq = mx.array(_inv_freq(a, None if w.rope_freqs is None
                                           else np.array(w.rope_freqs)))
        # float32 [slots * dim + 4]: the slots' partial sums, then a counter (zero bits: 0);
        # from NumPy, so that they exist before the first step without an evaluation
        self.scratch = {name: mx.array(np.zeros(slots * a.dim + 4, np.float32))
                        for name, slots in (("attend", a.n_heads),
                                            ("ffn", a.hidden_dim // FFN_UNITS))}

    def __call__(self, token: mx.array, pos: mx.array, k: list, v: list):
        w = self.weights
        x = self.embed(token, w.token_embd)  # [dim]
        for layer, lw in enumerate(w.layers):
            (kbuf,), (vbuf,) = k[layer], v[layer]  # [n_kv_heads, capacity, head_dim]
            q, kv = self.norm_qkv_rope(x, lw, pos, kbuf.dtype)  # [n_heads*hd], [2*n_kv*hd]
            x = self.attend_project(q, kv, kbuf, vbuf, pos, lw.wo, x)  # [dim]
            x = self.ffn(x, lw)  # [dim]
        return self.norm_matvec(x, w.output_norm, w.output).reshape(1, -1), k, v

    # One kernel each (two for attention past ATTEND_SPLIT_KEYS of capacity) -----------------
    def embed(self, token: mx.array, table: "Linear") -> mx.array:
        """Row ``token [1]`` of ``table [vocab, dim]`` -> ``float32 [dim]`` (dequantized)."""
        n = self.args.dim
        (out,) = _kernel("embed", *self.consts, _quantized(table))(
            inputs=[token, *_arrays(table)], template=[("IN", n), ("BITS", table.bits)],
            output_shapes=[(n,)], output_dtypes=[mx.float32], grid=(n, 1, 1),
            threadgroup=(min(n, 256), 1, 1))
        return out

    def norm_qkv_rope(self, x: mx.array, lw, pos: mx.array, kv_dtype) -> tuple[mx.array, mx.array]:
        """``x [dim]`` -> q ``float32 [n_heads * head_dim]`` and k|v ``[2 * n_kv_heads *
        head_dim]`` in ``kv_dtype``, RoPE applied to q and k at position ``pos``."""
        a, wqkv = self.args, lw.wqkv.whole
        q_rows, kv_rows = a.n_heads * a.head_dim, 2 * a.n_kv_heads * a.head_dim
        units = (q_rows + kv_rows) // 2
        return _kernel("norm_qkv_rope", *self.consts, _quantized(wqkv))(
            inputs=[x, lw.attn_norm, *_arrays(wqkv), pos, self.inv_freq],
            template=[("IN", a.dim), ("UNITS", units), ("BITS", wqkv.bits), ("HD", a.head_dim),
                      ("Q_ROWS", q_rows), ("QK_ROWS", q_rows + kv_rows // 2)],
            output_shapes=[(q_rows,), (kv_rows,)], output_dtypes=[mx.float32, kv_dtype],
            **_rows_launch(units))

    def attend_project(self, q: mx.array, kv: mx.array, kbuf: mx.array, vbuf: mx.array,
                       pos: mx.array, wo: "Linear", r: mx.array, warps: int = ATTEND_WARPS,
                       unroll: int = ATTEND_UNROLL) -> mx.array:
        """``r + wo(attention)``: ``q [n_heads * head_dim]`` against the cached keys and values
        ``[n_kv_heads, capacity, head_dim]`` at positions ``0 .. pos - 1`` and this token's
        ``kv [2 * n_kv_heads * head_dim]`` at ``pos``, projected by ``wo [dim, n_heads *
        head_dim]`` and added to ``r [dim]`` -> ``float32 [dim]``. Writes ``kv`` into the
        buffers at ``pos``, in place (see ``_ATTEND``): the caller owns them.

        One block per head, which also projects its head (``fd_project``). Past
        ATTEND_SPLIT_KEYS of capacity, each head is split among several blocks (one per
        ATTEND_SPLIT_KEYS, at most ATTEND_MAX_SPLITS), whose partial softmaxes a second kernel
        merges and projects: one block per head would leave most of the GPU idle while it
        walks 4k keys."""
        a = self.args
        hd, nh = a.head_dim, a.n_heads
        splits = max(1, min(ATTEND_MAX_SPLITS, kbuf.shape[1] // ATTEND_SPLIT_KEYS))
        attention = [q, kv, kbuf, vbuf, pos]
        shape = [("NH", nh), ("NKV", a.n_kv_heads), ("HD", hd), ("DPL", hd // WARP),
                 ("NW", warps), ("U", unroll)]
        launch = dict(grid=(nh * splits * warps * WARP, 1, 1), threadgroup=(warps * WARP, 1, 1))
        project = [*_arrays(wo), r, self.scratch["attend"]]
        project_shape = [("DIM", a.dim), ("BITS", wo.bits)]
        if splits == 1:
            (out,) = _kernel("attend_project", *self.consts, _quantized(wo))(
                inputs=attention + project, template=shape + project_shape,
                output_shapes=[(a.dim,)], output_dtypes=[mx.float32], **launch)
            return out
        (part,) = _kernel("attend_split", *self.consts)(
            inputs=attention, template=shape, output_shapes=[(nh * splits * (hd + 2),)],
            output_dtypes=[mx.float32], **launch)
        (out,) = _kernel("attend_merge_project", *self.consts, _quantized(wo))(
            inputs=[part] + project, template=[("NH", nh), ("HD", hd)] + project_shape,
            output_shapes=[(a.dim,)], output_dtypes=[mx.float32],
            grid=(nh * max(ROWS_THREADS, hd), 1, 1), threadgroup=(max(ROWS_THREADS, hd), 1, 1))
        return out

    def ffn(self, x: mx.array, lw) -> mx.array:
        """``x + w_down(silu(gate) * up)`` of ``rms_norm(x)``: ``x [dim]`` -> ``float32 [dim]``.
        Blocks of FFN_UNITS hidden units each, their down projections summed by ``fd_project``."""
        a, gate_up, down = self.args, lw.w_gate_up.whole, lw.w_down
        (out,) = _kernel("ffn", *self.consts, _quantized(gate_up, down))(
            inputs=[x, lw.ffn_norm, *_arrays(gate_up), *_arrays(down), self.scratch["ffn"]],
            template=[("IN", a.dim), ("H", a.hidden_dim), ("SL", FFN_UNITS),
                      ("BITS", gate_up.bits), ("BITS2", down.bits)],
            output_shapes=[(a.dim,)], output_dtypes=[mx.float32],
            grid=(a.hidden_dim // FFN_UNITS * FFN_WARPS * WARP, 1, 1),
            threadgroup=(FFN_WARPS * WARP, 1, 1))
        return out

    def norm_matvec(self, x: mx.array, norm: mx.array, lin: "Linear") -> mx.array:
        """``lin(rms_norm(x))``: ``x [in]`` -> ``float32 [out]`` (the logits), one warp per
        output."""
        units = lin.weight.shape[0]
        (out,) = _kernel("norm_matvec", *self.consts, _quantized(lin))(
            inputs=[x, norm, *_arrays(lin)], template=[("IN", _in_features(lin)),
                                                       ("UNITS", units), ("BITS", lin.bits)],
            output_shapes=[(units,)], output_dtypes=[mx.float32], **_rows_launch(units))
        return out


def _quantized(*lins: "Linear") -> tuple[bool, ...]:
    return tuple(bool(lin.bits) for lin in lins)


def _arrays(lin: "Linear") -> list[mx.array]:
    """A weight's arrays as the kernels take them: ``w``, or ``w, scales, biases``."""
    return [lin.weight, lin.scales, lin.biases] if lin.bits else [lin.weight]


def _in_features(lin: "Linear") -> int:
    return lin.weight.shape[1] * 32 // lin.bits if lin.bits else lin.weight.shape[1]


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
