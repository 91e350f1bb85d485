/* turbo_key.cuh: one turbo_kv key chunk written by a warp and read by a lane, and a lane's share
of a stored value, as the decode step (turbo_attend.cuh) and the prefill
(turbo_prefill_quantize.cu, turbo_prefill_attend.cu) write and read them.

tk_lane_value<HD, DPL, VT, VB>(vc, row, e0, vv): this lane's DPL elements e0 .. e0 + DPL - 1 of
the value stored at row ``row`` (KV head times capacity plus position) of vc: VT 0 float32,
1 float16 ([rows, HD]); 2 q4 ((q - 8) * dq), 3 q2 (Q2[q] * dq, tk_q2), each 32 elements a group
of a float32 dq and the packed codes ([rows, VB] bytes).

tk_warp_quantize<CD, NLEV, KBITS, BB>(x, r, idx, blk, lane): a warp writes the block ``blk``
[BB] of the chunk x [CD] (float32, a power of two), the bytes of turbo_kv_quantize.cu
(quant.cpp's), the float32 operations of its one thread spread over the warp's lanes: lane 0
sums the squares sequentially (ss = ss + x[i] * x[i], as quant.cpp), norm = sqrt, r = x times
1 / norm, the sign flip, the Walsh-Hadamard butterfly across the warp in shared memory (r:
[CD] floats of the warp's own), times 1 / sqrt(CD), s = CENT_MAX / max|r|, the first nearest
centroid of each r * s (idx: [CD] bytes of the warp's own), packed LSB-first after the 8-byte
header (truncating fp16 norm and s). Needs TK_CMAX, tk_cent, tk_q2 and tk_f16_trunc before
them (TurboSpec.header, turbo_kv_common.cuh).

tk_lane_key<KBITS, DPL, CD, PATH>(blk, i0, sm_tab, y, norm, sc): the block ``blk`` (a chunk of
CD elements: the header's fp16 norm at bytes 0-1 and scale s at 4-5, then the KBITS-bit
indices; shared/docs/turbo_kv_format.md) gives its *norm and *sc (a scale below 1e-10, never
made by the quantizer, reads as sqrt(CD), as quant.cpp reads it) and this lane's DPL entries,
chunk positions i0 .. i0 + DPL - 1, in y:
  PATH 0 (int8_codebook), PATH 1 (fp32_codebook): y[d] = T[idx] (sm_tab: the kind's int8 table
    as floats, or its centroids); the key in rotated space is y times the chunk's factor,
    norm * (R / s) or norm / s, which the caller applies (a score: factor * (qr . y));
  PATH 2 (dequant): y[d] = C[idx] / s times 1 / sqrt(CD), through the inverse butterfly across
    the warp's lanes (shuffles: every lane of the warp calls it); the key is then
    ((i0 + d) odd ? y[d] : -y[d]) * norm (the caller applies it), bit for bit
    turbo_kv_dequantize.cu's values.
Needs tk_f16_decode (turbo_kv_common.cuh) before it. */
template <int HD, int DPL, int VT, int VB, typename VCT>
__device__ __forceinline__ void tk_lane_value(const VCT* vc, size_t row, int e0, float* vv) {
    if (VT == 0 || VT == 1) {
        const size_t at = row * HD + e0;
#pragma unroll
        for (int d = 0; d < DPL; ++d)
            vv[d] = VT == 0 ? reinterpret_cast<const float*>(vc)[at + d]
                            : __half2float(reinterpret_cast<const __half*>(vc)[at + d]);
    } else {
        constexpr int PK = VT == 2 ? 16 : 8;
        const unsigned char* grp = reinterpret_cast<const unsigned char*>(vc) + row * VB
            + (e0 / 32) * (4 + PK);
        const float dq = *reinterpret_cast<const float*>(grp);
#pragma unroll
        for (int d = 0; d < DPL; ++d) {
            const int e = (e0 + d) % 32;
            if (VT == 2) {
                const unsigned code = (grp[4 + e / 2] >> ((e & 1) * 4)) & 0xFu;
                vv[d] = __fmul_rn((float)code - 8.0f, dq);
            } else {
                const unsigned code = (grp[4 + e / 4] >> ((e & 3) * 2)) & 0x3u;
                vv[d] = __fmul_rn(tk_q2[code], dq);
            }
        }
    }
}
template <int CD, int NLEV, int KBITS, int BB>
__device__ __forceinline__ void tk_warp_quantize(const float* x, float* r, unsigned char* idx,
                                                 unsigned char* blk, int lane) {
    constexpr unsigned FULL = 0xffffffffu;
    float ss = 0.0f;
    if (lane == 0) {  /* sequential, as quant.cpp: ss = ss + x[i] * x[i] */
        for (int i = 0; i < CD; ++i) ss = __fadd_rn(ss, __fmul_rn(x[i], x[i]));
    }
    ss = __shfl_sync(FULL, ss, 0);
    const float norm = __fsqrt_rn(ss);
    const float inv = norm > 1e-10f ? __fdiv_rn(1.0f, norm) : 0.0f;
    for (int i = lane; i < CD; i += 32) {
        const float v = __fmul_rn(x[i], inv);
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
        blk[k] = (unsigned char)byte;
    }
}
template <int KBITS, int DPL, int CD, int PATH>
__device__ __forceinline__ void tk_lane_key(const unsigned char* blk, int i0,
                                            const float* sm_tab, float* y, float* norm,
                                            float* sc) {
    *norm = tk_f16_decode((unsigned)blk[0] | ((unsigned)blk[1] << 8));
    *sc = tk_f16_decode((unsigned)blk[4] | ((unsigned)blk[5] << 8));
    if (*sc < 1e-10f) *sc = __fsqrt_rn((float)CD);  /* never made by quantize */
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
#pragma unroll
    for (int d = 0; d < DPL; ++d)
        y[d] = sm_tab[(unsigned)(bitsw >> (KBITS * d)) & ((1u << KBITS) - 1u)];
    if (PATH == 2) {
        /* dequantize in registers, bit for bit as turbo_kv_dequantize.cu */
        const float step = __fdiv_rn(1.0f, *sc);
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
                const float other = __shfl_xor_sync(0xffffffffu, y[d], mask);
                y[d] = upper ? __fsub_rn(other, y[d]) : __fadd_rn(y[d], other);
            }
        }
    }
}
