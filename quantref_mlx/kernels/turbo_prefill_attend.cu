/* turbo_prefill_attend.cu: prefill attention that reads turbo_kv key blocks directly, for a
chunk of T query rows, every query head (grouped-query: head h reads KV head g = h / (NH / NKV)).

What it computes, per query row r (position p = P + r, P = pos[0] the chunk's first position)
and query head h, exactly the attention of the plain graph (quantref_mlx.model.Model.attention
over quantref_mlx.cache.KVCache, the oracle's quantref.model.Model.attention): the chunk's keys
and values are already in the cache, its keys as blocks (turbo_prefill_quantize.cu, one launch
per layer, the oracle's bytes), so a row scores its own chunk's keys compressed, as the oracle
does.
1. Scores of the query against every key t <= p (causal; with SWIN > 0, a sliding-window layer,
   only t > p - SWIN), from the blocks, never dequantized to memory:
   PATH 0 (int8_codebook): norm_c * (R / s_c) * sum_i qr[i] * T[idx_i] per 128-element chunk c,
   PATH 1 (fp32_codebook): norm_c / s_c * sum_i qr[i] * C[idx_i], with qr the query rotated once
   per block by the same sign flip and butterfly (shared/docs/turbo_kv_format.md);
   PATH 2 (dequant): the key dequantized (C[idx] / s, times 1/sqrt(n2), the inverse butterfly
   across the warp's lanes with shuffles, the signs, times norm: the bits of
   turbo_kv_dequantize.cu) and dotted with the query.
   With a k-window (W > 0), a key younger than W tokens for this row (p - t < W) is read as
   float32 from kw and dotted with the unrotated query instead (quantref.cache.KVCache.scores).
2. An online softmax (scores scaled by TP_SCALE: 1/sqrt(HD), or 1 where the model scales its
   queries) and the values, read from their own storage and decoded in registers: fp32 / fp16
   as they are, q4 (q - 8) * dq, q2 Q2[q] * dq.
Keys and values are read as turbo_attend.cu reads them (tk_lane_key, tk_lane_value:
turbo_key.cuh, both files').

How (a flash-attention loop on CUDA cores, float32 throughout, as before): one block of NW
warps per (KV head g, tile of TQ rows): its NQ = TQ * G queries are the tile's rows times the G
query heads that read g, so a key block is read and decoded ONCE per tile of NQ queries (not
once per query as before). The keys lo .. p1 (p1 the tile's last row; lo 0, or the sliding
window's first) go by in tiles of 32: the warps decode a tile into shared memory (a warp per
key, as turbo_attend.cu: PATH 0 / 1 the rotated-domain key times its chunk's factor norm * R / s
or norm / s, so that a score is one dot product with the rotated query; PATH 2 the dequantized
key; up to head_dim 64 (VS) the tile's values too, decoded once a block, not once a warp),
then each warp scores its QW queries (lane j: key j, float32 sums over the elements in
order), keeps an online softmax per query (the maximum over the warp; each lane's share of the
sum, added up at the end) and adds the weights times the values (lane: elements lane * DPL ..).
Masked keys weigh 0; each warp's queries are its own, so no merge. The scores differ from the
oracle's (float64) by float32 rounding in another order, as before (the tests' 1e-5 of a row's
largest score).

Grid: NKV * ceil(T / TQ) blocks of NW * 32 threads (turbo_prefill._shape: at most one block an
SM where it can, a round of the grid); block b takes KV head b % NKV and row tile
ceil(T / TQ) - 1 - b / NKV (the longest rows first, so that short tiles fill in behind them).
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
Template: NH, NKV, HD, DPL (HD / 32), NW, TQ, KBITS, BB, NC, NLEV, PATH, VT, VB, W, SWIN (0: no
         sliding window). Static shared memory: 4 * (NQ * HD (twice with a k-window and PATH
         0 / 1) + 33 * HD + NW * QW * 32 + NLEV + 32 * HD with VS) bytes, under 48 KiB
         (turbo_prefill._shape picks TQ and NW). The header #defines TP_SCALE, TK_CMAX, TK_R, TK_KW (kw, or a null pointer without
         a k-window) and the __constant__ tables tk_cent (centroids), tk_tab (what multiplies a
         codebook index: T for PATH 0, else C), tk_q2
         (quantref_mlx.fused_decode.TurboSpec.header). */
    constexpr int CD = HD < 128 ? HD : 128;  /* elements per chunk: a power of two */
    constexpr int G = NH / NKV;
    constexpr int NQ = TQ * G;              /* queries of a block: TQ rows x the G heads */
    constexpr int QW = (NQ + NW - 1) / NW;  /* ... per warp */
    constexpr int KT = 32;                  /* keys per tile: one per lane when scoring */
    constexpr int KP = KT + 1;              /* sm_k's row stride (no bank conflicts) */
    constexpr bool QWIN = W > 0 && PATH != 2;  /* a second, unrotated copy of the queries */
    /* the tile's values decoded once a block into shared memory, not once a warp (where they
       fit beside the rest: head_dim 64 or less) */
    constexpr bool VS = HD <= 64;
    constexpr unsigned FULL = 0xffffffffu;
    const int T = q_shape[1];
    const int cap = kc_shape[1];
    const int P = pos[0];
    const int NX = pos[1];
    const int xlo = P + T - NX;     /* the position of kw's first key */
    const int ntiles = (T + TQ - 1) / TQ;
    const int g = (int)blockIdx.x % NKV;
    const int r0 = (ntiles - 1 - (int)blockIdx.x / NKV) * TQ;  /* the longest rows first */
    const int r1 = min(r0 + TQ, T) - 1;
    const int p0 = P + r0;          /* the block's first and last row positions */
    const int p1 = P + r1;
    const int lo = SWIN > 0 ? max(0, p0 - SWIN + 1) : 0;  /* keys lo .. p1 */
    const int warp = (int)(threadIdx.x >> 5);
    const int lane = (int)(threadIdx.x & 31);
    const float NEG_INF = __int_as_float(0xff800000);
    const int e0 = lane * DPL;      /* this lane's first element of a head (decode, values) */
    const int i0 = e0 % CD;         /* ... and its place in its chunk */
    const int c0 = e0 / CD;         /* ... and that chunk */

    __shared__ __align__(16) float sm_q[NQ * HD];  /* queries x TP_SCALE (PATH 0, 1: rotated) */
    __shared__ __align__(16) float sm_qw[QWIN ? NQ * HD : 4];  /* unrotated (k-window keys) */
    __shared__ float sm_k[HD * KP];                /* a tile's keys: element e of key j at e*KP+j */
    __shared__ __align__(16) float sm_p[NW * QW * KT];  /* each warp's softmax weights */
    __shared__ float sm_tab[NLEV];
    __shared__ __align__(16) float sm_v[VS ? KT * HD : 4];  /* VS: a tile's values, decoded */
    float* const qw = QWIN ? sm_qw : sm_q;  /* the query a k-window key is dotted with */

    /* The block's queries: query qi is row r0 + qi / G, head g * G + qi % G. */
    for (int i = (int)threadIdx.x; i < NQ * HD; i += (int)blockDim.x) {
        const int qi = i / HD;
        const int r = min(r0 + qi / G, T - 1);  /* rows past T: a copy, never written out */
        const int h = g * G + qi % G;
        const float v = q[((size_t)h * T + r) * HD + i % HD] * TP_SCALE;
        if (PATH == 2) {
            sm_q[i] = v;
        } else {
            sm_q[i] = (i & 1) ? v : -v;  /* the rotation's sign flip: even entries negated */
            if (QWIN) sm_qw[i] = v;
        }
    }
    for (int j = (int)threadIdx.x; j < NLEV; j += (int)blockDim.x) sm_tab[j] = tk_tab[j];
    __syncthreads();
    if (PATH != 2) {  /* the butterfly on every chunk of every query, then 1 / sqrt(CD) */
        for (int len = 1; len < CD; len *= 2) {
            for (int pr = (int)threadIdx.x; pr < NQ * HD / 2; pr += (int)blockDim.x) {
                const int i = (pr / len) * 2 * len + pr % len;  /* chunks are len-aligned */
                const float u = sm_q[i];
                const float w = sm_q[i + len];
                sm_q[i] = u + w;
                sm_q[i + len] = u - w;
            }
            __syncthreads();
        }
        const float rs = __fdiv_rn(1.0f, __fsqrt_rn((float)CD));
        for (int i = (int)threadIdx.x; i < NQ * HD; i += (int)blockDim.x) sm_q[i] *= rs;
    }
    __syncthreads();

    /* This warp's queries: qi = warp * QW + k (neighbouring rows: similar masks). */
    int qrow[QW];     /* position of the query's row; -1: no query */
    float m[QW];      /* running maximum */
    float lsum[QW];   /* this lane's share of the running sum (summed over lanes at the end) */
    float acc[QW][DPL];
#pragma unroll
    for (int k = 0; k < QW; ++k) {
        const int qi = warp * QW + k;
        qrow[k] = (qi < NQ && r0 + qi / G < T) ? P + r0 + qi / G : -1;
        m[k] = NEG_INF;
        lsum[k] = 0.0f;
#pragma unroll
        for (int d = 0; d < DPL; ++d) acc[k][d] = 0.0f;
    }
    float* const pw = sm_p + warp * QW * KT;

    for (int t0 = lo; t0 <= p1; t0 += KT) {
        const int nj = min(KT, p1 + 1 - t0);  /* keys of this tile: t0 .. t0 + nj - 1 */
        /* 1. Decode the tile's keys once, a warp per key (the bits of turbo_attend.cu), into
           sm_k: PATH 0 / 1 the rotated-domain key times its chunk's factor (score = rotated
           query . that), PATH 2 the key dequantized (score = query . key). */
        __syncthreads();  /* the last tile's sm_k (and sm_v) is read */
        for (int j = warp; j < (VS ? KT : nj); j += NW) {
            if (VS) {  /* the tile's values too, once for all the warps (zeros past nj) */
                float vv[DPL];
                if (j < nj) {
                    tk_lane_value<HD, DPL, VT, VB>(vc, (size_t)g * cap + t0 + j, e0, vv);
                } else {
#pragma unroll
                    for (int d = 0; d < DPL; ++d) vv[d] = 0.0f;
                }
#pragma unroll
                for (int d = 0; d < DPL; ++d) sm_v[j * HD + e0 + d] = vv[d];
                if (j >= nj) continue;  /* uniform across the warp */
            }
            const int t = t0 + j;
            const unsigned char* blk = reinterpret_cast<const unsigned char*>(kc)
                + (((size_t)g * cap + t) * NC + c0) * BB;
            float y[DPL], norm, sc;
            tk_lane_key<KBITS, DPL, CD, PATH>(blk, i0, sm_tab, y, &norm, &sc);
            if (PATH == 2) {  /* the dequantized key: the signs, times norm */
#pragma unroll
                for (int d = 0; d < DPL; ++d)
                    sm_k[(e0 + d) * KP + j] = __fmul_rn(((i0 + d) & 1) ? y[d] : -y[d], norm);
            } else {  /* the key in rotated space: T[idx] times the chunk's factor */
                const float f = PATH == 0 ? norm * (TK_R / sc) : norm / sc;
#pragma unroll
                for (int d = 0; d < DPL; ++d) sm_k[(e0 + d) * KP + j] = y[d] * f;
            }
        }
        __syncthreads();

        /* 2. Scores: lane j scores key t0 + j against each of the warp's queries. */
        const int t = t0 + lane;
        float s[QW];
#pragma unroll
        for (int k = 0; k < QW; ++k) s[k] = 0.0f;
        if (lane < nj) {
#pragma unroll 4
            for (int d = 0; d < HD; d += 4) {
                const float k0 = sm_k[(d + 0) * KP + lane];
                const float k1 = sm_k[(d + 1) * KP + lane];
                const float k2 = sm_k[(d + 2) * KP + lane];
                const float k3 = sm_k[(d + 3) * KP + lane];
#pragma unroll
                for (int k = 0; k < QW; ++k) {
                    const float4 qv = *reinterpret_cast<const float4*>(
                        sm_q + min(warp * QW + k, NQ - 1) * HD + d);
                    s[k] += qv.x * k0;
                    s[k] += qv.y * k1;
                    s[k] += qv.z * k2;
                    s[k] += qv.w * k3;
                }
            }
        }
        /* With a k-window: a key younger than W tokens for a row (p - t < W) is scored as its
           float key instead; only tiles that hold such a key for some row of the block. */
        if (W > 0 && t0 + KT - 1 >= p0 - W + 1) {
            float sw[QW];
#pragma unroll
            for (int k = 0; k < QW; ++k) sw[k] = 0.0f;
            if (lane < nj && t >= xlo && t > p0 - W) {
                const float* kp = TK_KW + ((size_t)g * NX + (t - xlo)) * HD;
                for (int d = 0; d < HD; d += 4) {
                    const float4 kv = *reinterpret_cast<const float4*>(kp + d);
#pragma unroll
                    for (int k = 0; k < QW; ++k) {
                        const float4 qv = *reinterpret_cast<const float4*>(
                            qw + min(warp * QW + k, NQ - 1) * HD + d);
                        sw[k] += qv.x * kv.x;
                        sw[k] += qv.y * kv.y;
                        sw[k] += qv.z * kv.z;
                        sw[k] += qv.w * kv.w;
                    }
                }
            }
#pragma unroll
            for (int k = 0; k < QW; ++k)
                if (qrow[k] - t < W) s[k] = sw[k];
        }

        /* 3. Online softmax per query; the weights to sm_p for the values. */
#pragma unroll
        for (int k = 0; k < QW; ++k) {
            const int p = qrow[k];
            const bool seen = lane < nj && t <= p && (SWIN == 0 || t > p - SWIN);
            const float sk = seen ? s[k] : NEG_INF;
#if defined(TP_SCORES)
            if (seen)
                scores[((size_t)(g * G + (warp * QW + k) % G) * T + (p - P)) * cap + t] = sk;
#endif
            float mt = sk;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) mt = fmaxf(mt, __shfl_xor_sync(FULL, mt, o));
            const float mn = fmaxf(m[k], mt);
            /* mn = -inf: no key seen yet (or no query); exp(-inf - finite) = 0 on the first */
            const float c = mn == NEG_INF ? 1.0f : expf(m[k] - mn);
            const float pj = seen ? expf(sk - mn) : 0.0f;
            lsum[k] = lsum[k] * c + pj;
#pragma unroll
            for (int d = 0; d < DPL; ++d) acc[k][d] *= c;
            m[k] = mn;
            pw[k * KT + lane] = pj;
        }
        __syncwarp();

        /* 4. Values (lane: elements e0 .. e0 + DPL - 1), weighted: from sm_v (VS), or decoded
           here in registers by each warp. */
        for (int j0 = 0; j0 < nj; j0 += 4) {
            float vv[4][DPL];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                if (VS) {  /* rows nj .. KT - 1 hold zeros */
#pragma unroll
                    for (int d = 0; d < DPL; ++d) vv[u][d] = sm_v[(j0 + u) * HD + e0 + d];
                } else if (j0 + u >= nj) {
#pragma unroll
                    for (int d = 0; d < DPL; ++d) vv[u][d] = 0.0f;
                } else {
                    tk_lane_value<HD, DPL, VT, VB>(vc, (size_t)g * cap + t0 + j0 + u, e0, vv[u]);
                }
            }
#pragma unroll
            for (int k = 0; k < QW; ++k) {
                const float4 pp = *reinterpret_cast<const float4*>(pw + k * KT + j0);
#pragma unroll
                for (int d = 0; d < DPL; ++d) {
                    acc[k][d] += pp.x * vv[0][d];
                    acc[k][d] += pp.y * vv[1][d];
                    acc[k][d] += pp.z * vv[2][d];
                    acc[k][d] += pp.w * vv[3][d];
                }
            }
        }
        __syncwarp();  /* pw is read before the next tile writes it */
    }

    /* The sums over lanes, the output. */
#pragma unroll
    for (int k = 0; k < QW; ++k) {
        float total = lsum[k];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(FULL, total, o);
        if (qrow[k] < 0) continue;  /* uniform across the warp */
        const int qi = warp * QW + k;
        const int h = g * G + qi % G;
        float* o = out + (size_t)(qrow[k] - P) * (NH * HD) + h * HD + e0;
#pragma unroll
        for (int d = 0; d < DPL; ++d) o[d] = acc[k][d] / total;  /* total > 0: key p is seen */
    }
