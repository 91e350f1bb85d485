/* turbo_prefill_attend.cu: prefill attention that reads turbo_kv key blocks directly, for a
chunk of T query rows, every query head (grouped-query: head h reads KV head g = h / (NH / NKV)).

What it computes, per query row r (position p = P + r, P = pos[0] the chunk's first position)
and query head h, exactly the attention of the plain graph (quantref_mlx.model.Model.attention
over quantref_mlx.cache.KVCache, the oracle's quantref.model.Model.attention): the chunk's keys
and values are already in the cache, its keys as blocks (turbo_kv_quantize.cu, one launch per
layer, the oracle's bytes), so a row scores its own chunk's keys compressed, as the oracle does.
1. Scores of the query against every key t <= p (causal; with SWIN > 0, a sliding-window layer,
   only t > p - SWIN), from the blocks, never dequantized to memory:
   PATH 0 (int8_codebook): norm_c * (R / s_c) * sum_i qr[i] * T[idx_i] per 128-element chunk c,
   PATH 1 (fp32_codebook): norm_c / s_c * sum_i qr[i] * C[idx_i], with qr the query rotated once
   per block by the same sign flip and butterfly (shared/docs/turbo_kv_format.md);
   PATH 2 (dequant): the key dequantized in registers (C[idx] / s, times 1/sqrt(n2), the inverse
   butterfly across the warp's lanes with shuffles, the signs, times norm: the bits of
   turbo_kv_dequantize.cu) and dotted with the query.
   With a k-window (W > 0), a key younger than W tokens for this row (p - t < W) is read as
   float32 from kw and dotted with the unrotated query instead (quantref.cache.KVCache.scores).
2. An online softmax (scores scaled by TP_SCALE: 1/sqrt(HD), or 1 where the model scales its
   queries) and the values, read from their own storage and decoded in registers: fp32 / fp16
   as they are, q4 (q - 8) * dq, q2 Q2[q] * dq.
Every warp keeps its own maximum and sum over keys t = lo + warp, lo + warp + NW, ... (U at a
time); the warps merge at the end, as turbo_attend.cu (FD_SPLIT 1 with one split, without the
in-kernel quantize). The score and value code is copied from turbo_attend.cu and adapted (that
file is left as it is): a change to how blocks or values are read belongs in both files.

Grid: T * NH blocks of NW * 32 threads, one block per (query row, head); block b takes row
T - 1 - b / NH (the longest rows first) and head b % NH (the heads of one KV group side by side,
reading the same keys at about the same time).
Inputs:  q float32 [NH, T, HD] (after RoPE, and the model's query scale if it has one),
         kc uint8 [NKV, CAP, NC, BB] (the key blocks, positions < P + T filled),
         vc [NKV, CAP, HD] float32 (VT 0) or float16 (VT 1), or uint8 [NKV, CAP, VB] (VT 2 q4,
         VT 3 q2: per 32 values a float32 scale and 16 / 8 bytes of codes),
         kw float32 [NKV, NX, HD] (only when W > 0: the float keys of positions P + T - NX ..
         P + T - 1, the cache's k-window with this chunk's keys),
         pos int32 [4]: P in pos[0], NX in pos[1] (0 without a k-window).
Output:  out float32 [T, NH * HD]: row r, head h at columns h * HD .. h * HD + HD - 1 (the plain
         graph's attention output, before the output projection).
         TP_SCORES defined (for tests): also scores float32 [NH, T, CAP], each score times
         TP_SCALE at its key's position (the rest left unwritten).
Template: NH, NKV, HD, DPL (HD / 32), NW, U, KBITS, BB, NC, NLEV, PATH, VT, VB, W, SWIN (0: no
         sliding window). The header #defines TP_SCALE, TK_CMAX, TK_R, TK_KW (kw, or a null
         pointer without a k-window) and the __constant__ tables tk_cent (centroids), tk_tab
         (what multiplies a codebook index: T for PATH 0, else C), tk_q2
         (quantref_mlx.fused_decode.TurboSpec.header). */
    constexpr int CD = HD < 128 ? HD : 128;  /* elements per chunk: a power of two */
    constexpr int G = NH / NKV;
    constexpr unsigned FULL = 0xffffffffu;
    const int T = q_shape[1];
    const int cap = kc_shape[1];
    const int P = pos[0];
    const int NX = pos[1];
    const int xlo = P + T - NX;     /* the position of kw's first key */
    const int r = T - 1 - (int)blockIdx.x / NH;
    const int h = (int)blockIdx.x % NH;
    const int g = h / G;
    const int p = P + r;            /* this row's position */
    const int lo = SWIN > 0 ? max(0, p - SWIN + 1) : 0;
    const int hi = p + 1;           /* keys lo .. p */
    const int warp = (int)(threadIdx.x >> 5);
    const int lane = (int)(threadIdx.x & 31);
    const float NEG_INF = __int_as_float(0xff800000);
    const int e0 = lane * DPL;      /* this lane's first element of a head */
    const int i0 = e0 % CD;         /* ... and its place in its chunk */
    const int c0 = e0 / CD;         /* ... and that chunk */

    __shared__ float sm_q[HD];      /* the query times TP_SCALE */
    __shared__ float sm_qr[HD];     /* ... rotated chunk by chunk (PATH 0, 1) */
    __shared__ float sm_tab[NLEV];
    __shared__ float sm_m[NW];
    __shared__ float sm_l[NW];
    __shared__ float sm_acc[NW * HD];

    const float* qrow = q + ((size_t)h * T + r) * HD;
    for (int i = (int)threadIdx.x; i < HD; i += (int)blockDim.x) {
        const float v = qrow[i] * TP_SCALE;
        sm_q[i] = v;
        sm_qr[i] = (i & 1) ? v : -v;  /* the rotation's sign flip: even entries negated */
    }
    for (int j = (int)threadIdx.x; j < NLEV; j += (int)blockDim.x) sm_tab[j] = tk_tab[j];
    __syncthreads();
    if (PATH != 2) {  /* the butterfly on every chunk at once, then 1 / sqrt(CD) */
        for (int len = 1; len < CD; len *= 2) {
            for (int pr = (int)threadIdx.x; pr < HD / 2; pr += (int)blockDim.x) {
                const int i = (pr / len) * 2 * len + pr % len;  /* chunks are len-aligned */
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
    __syncthreads();

    /* 1, 2. Scores from the blocks, online softmax, values. */
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
            if (W > 0 && p - t < W) {  /* in the k-window: the float key */
                const float* kp = TK_KW + ((size_t)g * NX + (t - xlo)) * HD;
#pragma unroll
                for (int d = 0; d < DPL; ++d) s[u] += sm_q[e0 + d] * kp[e0 + d];
            } else {
                const unsigned char* blk = reinterpret_cast<const unsigned char*>(kc)
                    + (((size_t)g * cap + t) * NC + c0) * BB;
                const float norm = tk_f16_decode((unsigned)blk[0] | ((unsigned)blk[1] << 8));
                float sc = tk_f16_decode((unsigned)blk[4] | ((unsigned)blk[5] << 8));
                if (sc < 1e-10f) sc = __fsqrt_rn((float)CD);  /* never made by quantize */
                /* this lane's DPL indices: stream bits KBITS * i0 .. KBITS * (i0 + DPL) */
                const int b0 = KBITS * i0;
                constexpr int NBYTES = (7 + KBITS * DPL + 7) / 8;
                unsigned long long bitsw = 0ull;
                const int first = 8 + (b0 >> 3);
                const int need = ((b0 & 7) + KBITS * DPL + 7) >> 3;
#pragma unroll
                for (int k = 0; k < NBYTES; ++k)
                    if (k < need) bitsw |= (unsigned long long)blk[first + k] << (8 * k);
                bitsw >>= (b0 & 7);
                float y[DPL];
#pragma unroll
                for (int d = 0; d < DPL; ++d)
                    y[d] = sm_tab[(unsigned)(bitsw >> (KBITS * d)) & ((1u << KBITS) - 1u)];
                if (PATH == 2) {
                    /* dequantize in registers, bit for bit as turbo_kv_dequantize.cu */
                    const float step = __fdiv_rn(1.0f, sc);
                    const float rs = __fdiv_rn(1.0f, __fsqrt_rn((float)CD));
#pragma unroll
                    for (int d = 0; d < DPL; ++d) y[d] = __fmul_rn(__fmul_rn(y[d], step), rs);
#pragma unroll
                    for (int len = 1; len < DPL && len < CD; len *= 2) {  /* within the lane */
#pragma unroll
                        for (int d = 0; d < DPL; ++d) {
                            if (d & len) continue;
                            const float a = y[d];
                            const float b = y[d + len];
                            y[d] = __fadd_rn(a, b);
                            y[d + len] = __fsub_rn(a, b);
                        }
                    }
#pragma unroll
                    for (int len = DPL; len < CD; len *= 2) {  /* across lanes */
                        const int mask = len / DPL;
                        const bool upper = (i0 & len) != 0;
#pragma unroll
                        for (int d = 0; d < DPL; ++d) {
                            const float other = __shfl_xor_sync(FULL, y[d], mask);
                            y[d] = upper ? __fsub_rn(other, y[d]) : __fadd_rn(y[d], other);
                        }
                    }
                    float a = 0.0f;
#pragma unroll
                    for (int d = 0; d < DPL; ++d) {
                        const float k = __fmul_rn(((i0 + d) & 1) ? y[d] : -y[d], norm);
                        a += sm_q[e0 + d] * k;
                    }
                    s[u] = a;
                } else {
                    float a = 0.0f;
#pragma unroll
                    for (int d = 0; d < DPL; ++d) a += sm_qr[e0 + d] * y[d];
                    s[u] = a * (PATH == 0 ? norm * (TK_R / sc) : norm / sc);
                }
            }
            /* the value, decoded in registers */
            if (VT == 0 || VT == 1) {
                const size_t at = ((size_t)g * cap + t) * HD + e0;
#pragma unroll
                for (int d = 0; d < DPL; ++d)
                    vv[u][d] = VT == 0 ? reinterpret_cast<const float*>(vc)[at + d]
                                       : __half2float(reinterpret_cast<const __half*>(vc)[at + d]);
            } else {
                constexpr int PK = VT == 2 ? 16 : 8;
                const unsigned char* grp = reinterpret_cast<const unsigned char*>(vc)
                    + ((size_t)g * cap + t) * VB + (e0 / 32) * (4 + PK);
                const float dq = *reinterpret_cast<const float*>(grp);
#pragma unroll
                for (int d = 0; d < DPL; ++d) {
                    const int e = (e0 + d) % 32;
                    if (VT == 2) {
                        const unsigned code = (grp[4 + e / 2] >> ((e & 1) * 4)) & 0xFu;
                        vv[u][d] = __fmul_rn((float)code - 8.0f, dq);
                    } else {
                        const unsigned code = (grp[4 + e / 4] >> ((e & 3) * 2)) & 0x3u;
                        vv[u][d] = __fmul_rn(tk_q2[code], dq);
                    }
                }
            }
        }
        float mn = m;
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) s[u] += __shfl_xor_sync(FULL, s[u], o);
            if (t0 + u * NW < hi) mn = fmaxf(mn, s[u]);
#if defined(TP_SCORES)
            if (lane == 0 && t0 + u * NW < hi)
                scores[((size_t)h * T + r) * cap + t0 + u * NW] = s[u];
#endif
        }
        const float c = expf(m - mn);  /* 0 on a warp's first keys (m = -inf) */
        l *= c;
#pragma unroll
        for (int d = 0; d < DPL; ++d) acc[d] *= c;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (t0 + u * NW < hi) {
                const float pu = expf(s[u] - mn);
                l += pu;
#pragma unroll
                for (int d = 0; d < DPL; ++d) acc[d] += pu * vv[u][d];
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
    float M = NEG_INF;
    for (int w = 0; w < NW; ++w) M = fmaxf(M, sm_m[w]);
    for (int i = (int)threadIdx.x; i < HD; i += (int)blockDim.x) {
        float total = 0.0f;
        float o = 0.0f;
        for (int w = 0; w < NW; ++w) {
            if (sm_m[w] == NEG_INF) continue;  /* a warp that had no key */
            const float e = expf(sm_m[w] - M);
            total += sm_l[w] * e;
            o += sm_acc[w * HD + i] * e;
        }
        out[(size_t)r * (NH * HD) + h * HD + i] = o / total;  /* total > 0: key p is seen */
    }
