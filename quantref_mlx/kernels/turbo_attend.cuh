/* turbo_attend.cuh: the body of turbo_attend.cu as a function of a block index, which the kernel
calls with its own and the persistent step (persistent.cu, turbo_kv caches) calls for the blocks
it takes; see turbo_attend.cu for what it computes, its inputs and its template parameters.
SPLIT and SCORES are FD_SPLIT and FD_SCORES; kw is TK_KW (a null pointer without a k-window). */
template <int NH, int NKV, int HD, int DPL, int NW, int U, int KBITS, int BB, int NC, int NLEV,
          int PATH, int VT, int VB, int W, bool SPLIT, bool SCORES, int DIM, int BITS,
          typename VCT, typename WT>
__device__ void fd_turbo_attend(int vb, int nvb, const float* q, const float* kv,
                                const uint8_t* kc, const VCT* vc, const float* kw, int cap,
                                const int* pos, const WT* w, const float* sc, const float* bi,
                                const float* r, const float* part, float* out, float* scores) {
    constexpr int CD = HD < 128 ? HD : 128;  /* elements per chunk: a power of two */
    constexpr int G = NH / NKV;
    constexpr unsigned FULL = 0xffffffffu;
    constexpr int WR = W > 0 ? W : 1;  /* the ring's length (unused without a k-window) */
    const int S = nvb / NH;
    const int h = vb / S;
    const int split = vb % S;
    const int g = h / G;
    const int warp = (int)(threadIdx.x >> 5);
    const int lane = (int)(threadIdx.x & 31);
    const int L = pos[0] + 1;
    const int chunk = (L + S - 1) / S;
    const int lo = split * chunk;
    const int hi = min(L, lo + chunk);
    const bool has_last = lo <= L - 1 && L - 1 < hi;  /* this block scores this token's key */
    const bool writer = has_last && h % G == 0;
    const float NEG_INF = __int_as_float(0xff800000);
    const int e0 = lane * DPL;      /* this lane's first element of a head */
    const int i0 = e0 % CD;         /* ... and its place in its chunk */
    const int c0 = e0 / CD;         /* ... and that chunk */

    __shared__ float sm_q[HD];      /* the query times FD_SCALE */
    __shared__ float sm_qr[HD];     /* ... rotated chunk by chunk (PATH 0, 1) */
    __shared__ float sm_r[HD];      /* this token's key on its way to indices */
    __shared__ unsigned char sm_idx[HD];
    __shared__ unsigned char sm_blk[NC * BB];  /* this token's key blocks */
    __shared__ float sm_v[HD];      /* this token's value as the cache gives it back */
    __shared__ float sm_tab[NLEV];
    __shared__ float sm_m[NW];
    __shared__ float sm_l[NW];
    __shared__ float sm_acc[NW * HD];

    for (int i = (int)threadIdx.x; i < HD; i += (int)blockDim.x) {
        const float v = q[h * HD + i] * FD_SCALE;
        sm_q[i] = v;
        sm_qr[i] = (i & 1) ? v : -v;  /* the rotation's sign flip: even entries negated */
    }
    for (int j = (int)threadIdx.x; j < NLEV; j += (int)blockDim.x) sm_tab[j] = tk_tab[j];
    __syncthreads();
    if (PATH != 2) {  /* the butterfly on every chunk at once, then 1 / sqrt(CD) */
        for (int len = 1; len < CD; len *= 2) {
            for (int p = (int)threadIdx.x; p < HD / 2; p += (int)blockDim.x) {
                const int i = (p / len) * 2 * len + p % len;  /* chunks are len-aligned */
                const float u = sm_qr[i];
                const float w = sm_qr[i + len];
                sm_qr[i] = u + w;
                sm_qr[i + len] = u - w;
            }
            __syncthreads();
        }
        const float rs = __fdiv_rn(1.0f, __fsqrt_rn((float)CD));
        for (int i = (int)threadIdx.x; i < HD; i += (int)blockDim.x) sm_qr[i] *= rs;
    }

    /* 1. This token's key (warp 0) and value (warp NW - 1), exactly as the oracle stores them. */
    if (has_last && warp == 0) {
        for (int c = 0; c < NC; ++c) {
            tk_warp_quantize<CD, NLEV, KBITS, BB>(kv + g * HD + c * CD, sm_r + c * CD,
                                                  sm_idx + c * CD, sm_blk + c * BB, lane);
            __syncwarp();
        }
        if (writer) {
            unsigned char* dst = const_cast<unsigned char*>(
                reinterpret_cast<const unsigned char*>(kc)) + ((size_t)g * cap + (L - 1)) * NC * BB;
            for (int k = lane; k < NC * BB; k += 32) dst[k] = sm_blk[k];
            if (W > 0) {  /* the float key, into the k-window's ring */
                float* kwp = const_cast<float*>(kw) + ((size_t)g * WR + (L - 1) % WR) * HD;
                for (int i = lane; i < HD; i += 32) kwp[i] = kv[g * HD + i];
            }
        }
    }
    if (has_last && warp == NW - 1) {
        const float* x = kv + (NKV + g) * HD;
        if (VT == 0 || VT == 1) {
            for (int i = lane; i < HD; i += 32) {
                if (VT == 0) {
                    sm_v[i] = x[i];
                    if (writer) fd_poke(reinterpret_cast<const float*>(vc) +
                                        ((size_t)g * cap + (L - 1)) * HD + i, x[i]);
                } else {
                    const __half hv = __float2half_rn(x[i]);
                    sm_v[i] = __half2float(hv);
                    if (writer) fd_poke(reinterpret_cast<const __half*>(vc) +
                                        ((size_t)g * cap + (L - 1)) * HD + i, hv);
                }
            }
        } else {  /* q4 / q2: one group of 32 values per pass, lane e holds element e */
            constexpr int PK = VT == 2 ? 16 : 8;  /* code bytes per group */
            unsigned char* row = const_cast<unsigned char*>(
                reinterpret_cast<const unsigned char*>(vc)) + ((size_t)g * cap + (L - 1)) * VB;
            for (int gi = 0; gi < HD / 32; ++gi) {
                const float xv = x[gi * 32 + lane];
                float amax = fabsf(xv);
                for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL, amax, o));
                const float dq = __fdiv_rn(amax, VT == 2 ? 7.0f : tk_q2[3]);
                const float inv = dq > 1e-10f ? __fdiv_rn(1.0f, dq) : 0.0f;
                const float v = __fmul_rn(xv, inv);
                unsigned code;
                float back;
                if (VT == 2) {
                    const float qf = fminf(fmaxf(roundf(v) + 8.0f, 0.0f), 15.0f);
                    code = (unsigned)qf;
                    back = __fmul_rn(qf - 8.0f, dq);
                } else {
                    int best = 0;
                    float best_dist = fabsf(__fsub_rn(v, tk_q2[0]));
                    for (int j = 1; j < 4; ++j) {
                        const float dist = fabsf(__fsub_rn(v, tk_q2[j]));
                        if (dist < best_dist) {
                            best_dist = dist;
                            best = j;
                        }
                    }
                    code = (unsigned)best;
                    back = __fmul_rn(tk_q2[best], dq);
                }
                sm_v[gi * 32 + lane] = back;
                /* the group's bytes: scale (little-endian float32), then the codes LSB first */
                unsigned packed = code;
                constexpr int PER = 32 / PK;  /* codes per byte: 2 or 4 */
                for (int k = 1; k < PER; ++k)
                    packed |= __shfl_down_sync(FULL, code, k) << (k * (8 / PER));
                if (writer) {
                    unsigned char* grp = row + gi * (4 + PK);
                    if (lane < 4) grp[lane] = (unsigned char)((__float_as_uint(dq) >> (8 * lane)) & 0xFFu);
                    if (lane % PER == 0) grp[4 + lane / PER] = (unsigned char)(packed & 0xFFu);
                }
            }
        }
    }
    __syncthreads();

    /* 2, 3. Scores from the blocks, online softmax, values. */
    float acc[DPL];
#pragma unroll
    for (int d = 0; d < DPL; ++d) acc[d] = 0.0f;
    float m = NEG_INF;
    float l = 0.0f;
    for (int t0 = lo + warp; t0 < hi; t0 += NW * U) {
        float s[U];
        float vv[U][DPL];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = t0 + u * NW;
            s[u] = 0.0f;
            if (t >= hi) continue;  /* uniform across the warp */
            const bool last = t == L - 1;
            if (W > 0 && L - 1 - t < WR) {  /* in the k-window: the float key */
                const float* kp = last ? kv + g * HD : kw + ((size_t)g * WR + t % WR) * HD;
#pragma unroll
                for (int d = 0; d < DPL; ++d) s[u] += sm_q[e0 + d] * kp[e0 + d];
            } else {
                const unsigned char* blk = last ? sm_blk + c0 * BB
                    : reinterpret_cast<const unsigned char*>(kc) + (((size_t)g * cap + t) * NC + c0) * BB;
                float y[DPL], norm, sc;
                tk_lane_key<KBITS, DPL, CD, PATH>(blk, i0, sm_tab, y, &norm, &sc);
                if (PATH == 2) {  /* the dequantized key: the signs, times norm */
                    float a = 0.0f;
#pragma unroll
                    for (int d = 0; d < DPL; ++d) {
                        const float k = __fmul_rn(((i0 + d) & 1) ? y[d] : -y[d], norm);
                        a += sm_q[e0 + d] * k;
                    }
                    s[u] = a;
                } else {  /* T[idx] against the rotated query, times the chunk's factor */
                    float a = 0.0f;
#pragma unroll
                    for (int d = 0; d < DPL; ++d) a += sm_qr[e0 + d] * y[d];
                    s[u] = a * (PATH == 0 ? norm * (TK_R / sc) : norm / sc);
                }
            }
            /* the value, decoded in registers */
            if (last) {
#pragma unroll
                for (int d = 0; d < DPL; ++d) vv[u][d] = sm_v[e0 + d];
            } else {
                tk_lane_value<HD, DPL, VT, VB>(vc, (size_t)g * cap + t, e0, vv[u]);
            }
        }
        float mn = m;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            s[u] = fd_sum(s[u]);
            if (t0 + u * NW < hi) mn = fmaxf(mn, s[u]);
            if constexpr (SCORES)
                if (lane == 0 && t0 + u * NW < hi) scores[(size_t)h * cap + t0 + u * NW] = s[u];
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
    for (int d = 0; d < DPL; ++d) sm_acc[warp * HD + e0 + d] = acc[d];
    __syncthreads();
    __shared__ float sm_o[HD];
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

/* fd_turbo_attend's split form (no k-window, no scores) as a call of its own, for the persistent
step: not inlined, so that its registers are allocated apart from the rest of that kernel's
(inlined there, the dequant path's in-register butterfly took the kernel to 155 registers a
thread, over the 128 that 512 resident threads allow; alone it takes ~60). */
template <int NH, int NKV, int HD, int DPL, int NW, int U, int KBITS, int BB, int NC, int NLEV,
          int PATH, int VT, int VB, typename VCT>
__device__ __noinline__ void fd_turbo_attend_apart(int vb, int nvb, const float* q,
                                                   const float* kv, const uint8_t* kc,
                                                   const VCT* vc, int cap, const int* pos,
                                                   float* out) {
    fd_turbo_attend<NH, NKV, HD, DPL, NW, U, KBITS, BB, NC, NLEV, PATH, VT, VB, 0, true, false,
                    0, 0>(vb, nvb, q, kv, kc, vc, (const float*)nullptr, cap, pos,
                          (const float*)nullptr, (const float*)nullptr, (const float*)nullptr,
                          (const float*)nullptr, (const float*)nullptr, out, nullptr);
}
