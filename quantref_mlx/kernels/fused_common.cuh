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
