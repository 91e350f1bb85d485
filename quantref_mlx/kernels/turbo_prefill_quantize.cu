/* turbo_prefill_quantize.cu: a prefill chunk's keys as turbo_kv blocks, a warp per 128-element
chunk: the bytes of turbo_kv_quantize.cu (quant.cpp's), whose one thread per chunk walks 128
elements, a butterfly and a nearest-centroid search serially (latency-bound: a few hundred
threads for a chunk of T rows).

The steps and their float32 operations are those of turbo_attend.cuh's in-kernel quantize (the
decode step's, checked byte for byte on the GPU): lane 0 sums the squares sequentially
(ss = ss + x[i] * x[i], as quant.cpp), norm = sqrt, r = x / norm (times 1 / norm), the sign flip,
the Walsh-Hadamard butterfly across the warp in shared memory, times 1 / sqrt(CD),
s = CENT_MAX / max|r|, the first nearest centroid of each r * s, packed LSB-first after the
8-byte header (truncating fp16 norm and s). Whole power-of-two chunks only (CD = D below 128,
else 128 with D a multiple of 128: turbo_prefill.why_not's head sizes).
Grid: ceil(rows * NC / 4) blocks of 128 threads, a warp per (row, chunk).
Inputs:  x float32 [rows, D] (keys after RoPE).
Output:  out uint8 [rows, NC, BB].
Template: D, BB, KBITS, NLEV. The header #defines TK_CMAX and the __constant__ tk_cent
         (quantref_mlx.fused_decode.TurboSpec.header). */
    constexpr int CD = D < 128 ? D : 128;
    constexpr int NC = D / CD;
    constexpr unsigned FULL = 0xffffffffu;
    const int rows = x_shape[0];
    const int warp = (int)(threadIdx.x >> 5);
    const int lane = (int)(threadIdx.x & 31);
    const int wid = (int)blockIdx.x * 4 + warp;
    __shared__ float sm_r[4][CD];
    __shared__ unsigned char sm_idx[4][CD];
    if (wid >= rows * NC) return;  /* the whole warp; no block-wide barrier follows */
    const int row = wid / NC;
    const int c = wid % NC;
    const float* xc = x + (size_t)row * D + c * CD;
    float* r = sm_r[warp];
    unsigned char* idx = sm_idx[warp];
    float ss = 0.0f;
    if (lane == 0) {  /* sequential, as quant.cpp: ss = ss + x[i] * x[i] */
        for (int i = 0; i < CD; ++i) ss = __fadd_rn(ss, __fmul_rn(xc[i], xc[i]));
    }
    ss = __shfl_sync(FULL, ss, 0);
    const float norm = __fsqrt_rn(ss);
    const float inv = norm > 1e-10f ? __fdiv_rn(1.0f, norm) : 0.0f;
    for (int i = lane; i < CD; i += 32) {
        const float v = __fmul_rn(xc[i], inv);
        r[i] = (i & 1) ? v : -v;
    }
    __syncwarp();
    for (int len = 1; len < CD; len *= 2) {
        for (int p = lane; p < CD / 2; p += 32) {
            const int i = (p / len) * 2 * len + p % len;
            const float u = r[i];
            const float w = r[i + len];
            r[i] = __fadd_rn(u, w);
            r[i + len] = __fsub_rn(u, w);
        }
        __syncwarp();
    }
    const float rs = __fdiv_rn(1.0f, __fsqrt_rn((float)CD));
    float m = 0.0f;
    for (int i = lane; i < CD; i += 32) {
        r[i] = __fmul_rn(r[i], rs);
        m = fmaxf(m, fabsf(r[i]));
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(FULL, m, o));
    if (m < 1e-10f) m = 1.0f;
    const float s = __fdiv_rn(TK_CMAX, m);
    for (int i = lane; i < CD; i += 32) {
        const float t = __fmul_rn(r[i], s);
        int best = 0;
        float best_dist = fabsf(__fsub_rn(t, tk_cent[0]));
        for (int j = 1; j < NLEV; ++j) {  /* the first strict minimum */
            const float dist = fabsf(__fsub_rn(t, tk_cent[j]));
            if (dist < best_dist) {
                best_dist = dist;
                best = j;
            }
        }
        idx[i] = (unsigned char)best;
    }
    __syncwarp();
    const unsigned hn = tk_f16_trunc(norm);
    const unsigned hs = tk_f16_trunc(s);
    unsigned char* dst = out + ((size_t)row * NC + c) * BB;
    for (int k = lane; k < BB; k += 32) {
        unsigned byte = 0u;
        if (k == 0) byte = hn & 0xFFu;
        else if (k == 1) byte = hn >> 8;
        else if (k == 4) byte = hs & 0xFFu;
        else if (k == 5) byte = hs >> 8;
        else if (k >= 8) {  /* stream bits 8(k - 8) .. 8(k - 8) + 7, LSB first */
            for (int b = 0; b < 8; ++b) {
                const int sb = (k - 8) * 8 + b;
                const int e = sb / KBITS;
                if (e < CD) byte |= ((idx[e] >> (sb % KBITS)) & 1u) << b;
            }
        }
        dst[k] = (unsigned char)byte;
    }
