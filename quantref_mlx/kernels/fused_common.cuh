/* fused_common.cuh: device helpers of the fused decode step's kernels (quantref_mlx.fused_decode).

Included (as MLX's ``header``) by every fused kernel: warp sums, loads of float32 / float16 /
MLX-packed 4- and 8-bit weights dequantized in registers to exactly the oracle's float32 values,
the matrix-vector products of one or two rows, and ``fd_project``, a product split by columns
among the blocks of a launch and summed, in a fixed order, by the block that finishes last.
The constants FD_EPS, FD_SCALE, FD_QUANT and FD_QUANT2 are #defined before this file
(``fused_decode._constants``). */

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

/* ---- The kernels' bodies, as functions of a block (or warp) index: each kernel file calls one
   with its own blockIdx.x, and the persistent step (persistent.cu) calls them all from one
   launch, for the indices its blocks take in turn. ---- */

/* norm_qkv_rope.cu, for output unit ``unit`` (rows 2 unit, 2 unit + 1) on one warp. */
template <int IN, int BITS, int HD, int Q_ROWS, int QK_ROWS, typename WT, typename KT>
__device__ __forceinline__ void fd_qkv_rope_unit(int unit, int lane, const float* x,
                                                 const float* nw, const WT* w, const float* sc,
                                                 const float* bi, const int* pos,
                                                 const float* inv_freq, float* q, KT* kv) {
    const int r0 = 2 * unit;
    float y[2], ss;
    fd_rows_dot<IN, 2, BITS>(w, sc, bi, r0, r0 + 1, x, nw, y, &ss, lane);
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
}

/* attend.cu, for block ``vb`` of ``nvb`` (nvb / NH splits per head); SPLIT: the split's partial
   softmax into out [nvb, HD + 2], else (one split per head) the head projected by fd_project. */
template <int NH, int NKV, int HD, int DPL, int NW, int U, bool SPLIT, int DIM, int BITS,
          typename KT, typename WT>
__device__ void fd_attend(int vb, int nvb, const float* q, const KT* kv, const KT* kc,
                          const KT* vc, int cap, const int* pos, const WT* w, const float* sc,
                          const float* bi, const float* r, const float* part, float* out) {
    __shared__ float sm_o[HD];
    const int S = nvb / NH;  /* splits per head: a launch parameter, not a template one, so
                                that a new capacity compiles nothing */
    const int h = vb / S;
    const int split = vb % S;
    const int g = h / (NH / NKV);
    const int warp = (int)(threadIdx.x >> 5);
    const int lane = (int)(threadIdx.x & 31);
    const int L = pos[0] + 1;
    const int chunk = (L + S - 1) / S;
    const int lo = split * chunk;
    const int hi = min(L, lo + chunk);
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
        if constexpr (SPLIT) {
            float* mine = out + (size_t)vb * (HD + 2);
            mine[threadIdx.x] = o;
            if (threadIdx.x == 0) {
                mine[HD] = M;
                mine[HD + 1] = total;
            }
        } else {
            sm_o[threadIdx.x] = o / total;
        }
    }
    if constexpr (!SPLIT) {
        __syncthreads();
        fd_project<DIM, NH * HD, HD, NH, BITS>(w, sc, bi, h * HD, sm_o, h, part, r, out);
    }
}

/* Element d of head h's attention output from its S splits' partial softmaxes (splits [NH * S,
   HD + 2]: each split's unnormalized o, maximum m and total l): sum_s o_s e^(m_s - M) / sum_s
   l_s e^(m_s - M), M the largest m_s; a split that had no key (m_s = -inf) is skipped. */
template <int HD>
__device__ __forceinline__ float fd_merge_splits(const float* splits, int h, int S, int d) {
    const float NEG_INF = __int_as_float(0xff800000);
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
    return o / total;
}

/* attend_merge_project.cu, for head h of S splits. */
template <int NH, int HD, int DIM, int BITS, typename WT>
__device__ void fd_merge_project(int h, int S, const float* splits, const WT* w, const float* sc,
                                 const float* bi, const float* r, const float* part, float* out) {
    const int d = (int)threadIdx.x;
    __shared__ float sm_o[HD];
    if (d < HD) sm_o[d] = fd_merge_splits<HD>(splits, h, S, d);
    __syncthreads();
    fd_project<DIM, NH * HD, HD, NH, BITS>(w, sc, bi, h * HD, sm_o, h, part, r, out);
}

/* ffn.cu, for block vb (hidden units vb * SL .. vb * SL + SL - 1). */
template <int IN, int H, int SL, int BITS, int BITS2, typename WT, typename WT2>
__device__ void fd_ffn(int vb, const float* x, const float* nw, const WT* w, const float* sc,
                       const float* bi, const WT2* w2, const float* sc2, const float* bi2,
                       const float* part, float* out) {
    const int warp = (int)(threadIdx.x >> 5);
    const int lane = (int)(threadIdx.x & 31);
    __shared__ float sm_h[SL];
    for (int u = warp; u < SL; u += (int)(blockDim.x >> 5)) {
        const int unit = vb * SL + u;
        float y[2], ss;
        fd_rows_dot<IN, 2, BITS>(w, sc, bi, unit, H + unit, x, nw, y, &ss, lane);
        if (lane == 0) {
            const float inv = fd_inv_rms(ss, IN, FD_EPS);
            const float g = y[0] * inv;
            sm_h[u] = g / (1.0f + expf(-g)) * (y[1] * inv);
        }
    }
    __syncthreads();
    fd_project<IN, H, SL, H / SL, BITS2>(w2, sc2, bi2, vb * SL, sm_h, vb, part, x, out);
}

/* norm_matvec.cu, for output unit ``unit`` on one warp: every lane gets the value. */
template <int IN, int BITS, typename WT>
__device__ __forceinline__ float fd_norm_row(int unit, int lane, const float* x, const float* nw,
                                             const WT* w, const float* sc, const float* bi) {
    float y[2], ss;
    fd_rows_dot<IN, 1, BITS>(w, sc, bi, unit, unit, x, nw, y, &ss, lane);
    return y[0] * fd_inv_rms(ss, IN, FD_EPS);
}
