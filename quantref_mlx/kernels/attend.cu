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
Template: NH, NKV, HD, DPL (HD / 32), NW, U; FD_SPLIT 0 also DIM, BITS. The body is fd_attend
(fused_common.cuh), which the persistent step calls too. */
#if FD_SPLIT
    fd_attend<NH, NKV, HD, DPL, NW, U, true, 0, 0>(
        (int)blockIdx.x, (int)gridDim.x, q, kv, kc, vc, kc_shape[1], pos, (const float*)nullptr,
        (const float*)nullptr, (const float*)nullptr, (const float*)nullptr,
        (const float*)nullptr, out);
#else
    fd_attend<NH, NKV, HD, DPL, NW, U, false, DIM, BITS>(
        (int)blockIdx.x, (int)gridDim.x, q, kv, kc, vc, kc_shape[1], pos, w, FD_QUANT, r, part,
        out);
#endif
