/* attend.cu: decode attention over an fp32 / fp16 cache, one token, every query head; with
FD_SPLIT 0 also that head's share of the output projection.

Per query head h (KV head g = h / (NH / NKV)): softmax(q_h . k_t * FD_SCALE) over the cached
keys t < pos and this token's key, times the values, with an online softmax (one pass, any
context length). Each warp keeps its own maximum and sum over keys t = warp, warp + NW, ...,
U keys at a time (their loads in flight together); the warps merge at the end.
This token's k and v are read from kv, and the first query head of each KV group writes them
into kc / vc at pos, in place (what a slice update of a buffer the decoder owns does, without
its two extra kernels per buffer and layer).
Grid: NH * S blocks of NW * 32 threads: S blocks ("splits") per head, each taking a contiguous
range of keys (S = gridDim.x / NH: a launch parameter, so a new capacity compiles nothing).
Inputs:  q float32 [NH * HD] (after RoPE), kv [2 * NKV * HD] (this token's k then v, in the
         cache's dtype), kc / vc [NKV, CAP, HD] float32 or float16 (positions < pos filled),
         pos int32 [4] (in pos[0]);
         FD_SPLIT 0 only: w [DIM, NH * HD] (the output projection, as in fd_dot),
         r float32 [DIM] (the residual), part float32 [NH * DIM + 4] (fd_project's scratch).
Output:  FD_SPLIT 0: out float32 [DIM] = r + W o (S must be 1).
         FD_SPLIT 1: out float32 [NH * S, HD + 2]: per block its unnormalized sum o [HD], its
         maximum and its total (merged by attend_merge_project.cu).
Template: NH, NKV, HD, DPL (HD / 32), NW, U; FD_SPLIT 0 also DIM, BITS. */
#if !FD_SPLIT
    __shared__ float sm_o[HD];
#endif
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
#if FD_SPLIT
        float* mine = out + (size_t)blockIdx.x * (HD + 2);
        mine[threadIdx.x] = o;
        if (threadIdx.x == 0) {
            mine[HD] = M;
            mine[HD + 1] = total;
        }
#else
        sm_o[threadIdx.x] = o / total;
#endif
    }
#if !FD_SPLIT
    __syncthreads();
    fd_project<DIM, NH * HD, HD, NH, BITS>(w, FD_QUANT, h * HD, sm_o, h, part, r, out);
#endif
