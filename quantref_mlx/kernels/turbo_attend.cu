/* turbo_attend.cu: decode attention that reads turbo_kv key blocks directly, one token, every
query head; with FD_SPLIT 0 also that head's share of the output projection.

What it computes, per query head h (KV head g = h / (NH / NKV)), for this token at position
L - 1 = pos[0]:
1. This token's key, quantized into its NC blocks exactly as quantref.turbo_kv.quantize (and
   turbo_kv_quantize.cu) does, by one warp: the sequential sum of squares on one lane, the rest
   element-parallel with one correctly rounded operation each (__fadd_rn, __fmul_rn, ...), so
   the bytes are the same. Its value is encoded into the V storage (fp32, fp16, q4, q2) and read
   back as the cache returns it. The split that holds position L - 1 of the first query head of
   each KV group writes both into the cache, in place (kc, vc; and the float key into the
   k-window's ring kw); every block that needs them keeps its own copy in shared memory.
2. Scores of the query against every key t < L from the blocks, never dequantized to memory:
   PATH 0 (int8_codebook): norm_c * (R / s_c) * sum_i qr[i] * T[idx_i] per 128-element chunk c,
   PATH 1 (fp32_codebook): norm_c / s_c * sum_i qr[i] * C[idx_i], with qr the query rotated once
   per block by the same sign flip and butterfly (shared/docs/turbo_kv_format.md);
   PATH 2 (dequant): the key dequantized in registers (C[idx] / s, times 1/sqrt(n2), the inverse
   butterfly across the warp's lanes with shuffles, the signs, times norm: the bits of
   turbo_kv_dequantize.cu) and dotted with the query.
   With a k-window (W > 0) a key younger than W tokens is read as float32 from kw (slot t % W)
   and dotted with the unrotated query instead.
3. An online softmax (scaled by FD_SCALE = 1/sqrt(HD)) and the values, read from their own
   storage and decoded in registers: fp32 / fp16 as they are, q4 (q - 8) * dq, q2 Q2[q] * dq.
Every warp keeps its own maximum and sum over keys t = warp, warp + NW, ... (U at a time); the
warps merge at the end, as attend.cu.

Grid: NH * S blocks of NW * 32 threads: S blocks ("splits") per head, each a contiguous range
of keys (S = gridDim.x / NH, a launch parameter).
Inputs:  q float32 [NH * HD] (after RoPE), kv float32 [2 * NKV * HD] (this token's k then v),
         kc uint8 [NKV, CAP, NC, BB] (the key blocks, positions < L - 1 filled),
         vc [NKV, CAP, HD] float32 (VT 0) or float16 (VT 1), or uint8 [NKV, CAP, VB] (VT 2 q4,
         VT 3 q2: per 32 values a float32 scale and 16 / 8 bytes of codes),
         kw float32 [NKV, W, HD] (only when W > 0: the newest W float keys, position p in
         slot p % W), pos int32 [4] (L - 1 in pos[0]);
         FD_SPLIT 0 only: w [DIM, NH * HD] (the output projection, as in fd_dot), r float32
         [DIM] (the residual), part float32 [NH * DIM + 4] (fd_project's scratch).
Output:  FD_SPLIT 0: out float32 [DIM] = r + W o (S must be 1).
         FD_SPLIT 1: out float32 [NH * S, HD + 2] as attend.cu (attend_merge_project.cu merges).
         FD_SCORES defined (for tests): also scores float32 [NH, CAP], each score times
         FD_SCALE at its key's position (the rest left unwritten).
Template: NH, NKV, HD, DPL (HD / 32), NW, U, KBITS, BB, NC, NLEV, PATH, VT, VB, W;
         FD_SPLIT 0 also DIM, BITS. The body is fd_turbo_attend (turbo_attend.cuh). The header #defines FD_SPLIT, FD_SCALE, TK_CMAX, TK_R,
         TK_KW (kw, or a null pointer without a k-window) and the __constant__ tables tk_cent
         (centroids), tk_tab (what multiplies a codebook index: T for PATH 0, else C), tk_q2. */
#if defined(FD_SCORES)
#define FD_SCORES_ARGS true
#define FD_SCORES_OUT scores
#else
#define FD_SCORES_ARGS false
#define FD_SCORES_OUT nullptr
#endif
#if FD_SPLIT
    fd_turbo_attend<NH, NKV, HD, DPL, NW, U, KBITS, BB, NC, NLEV, PATH, VT, VB, W, true,
                    FD_SCORES_ARGS, 0, 0>(
        (int)blockIdx.x, (int)gridDim.x, q, kv, kc, vc, TK_KW, kc_shape[1], pos,
        (const float*)nullptr, (const float*)nullptr, (const float*)nullptr,
        (const float*)nullptr, (const float*)nullptr, out, FD_SCORES_OUT);
#else
    fd_turbo_attend<NH, NKV, HD, DPL, NW, U, KBITS, BB, NC, NLEV, PATH, VT, VB, W, false, false,
                    DIM, BITS>(
        (int)blockIdx.x, (int)gridDim.x, q, kv, kc, vc, TK_KW, kc_shape[1], pos, w, FD_QUANT, r,
        part, out, nullptr);
#endif
