/* norm_qkv_rope.cu: RMSNorm, the fused Q|K|V matrix-vector product and RoPE, for one token.

Computes  y = Wqkv rms_norm(x) * nw, then RoPE on the q and k rows at position pos[0]: unit p
is rows 2p and 2p + 1, an adjacent pair (GGUF Llama's RoPE form), turned by the angle
pos * inv_freq[(2p % HD) / 2] (fd_qkv_rope_unit in fused_common.cuh).
Grid: UNITS = (Q_ROWS + KV_ROWS) / 2 warps, blocks of 128 threads; one warp per pair of rows.
Inputs:  x float32 [IN], nw float32 [IN], w [Q_ROWS + KV_ROWS, IN] as in fd_dot,
         pos int32 [4] (the position in pos[0]: see fused_decode._kernel on scalars),
         inv_freq float32 [HD / 2] (0 past the rotated dimensions: the identity).
Outputs: q float32 [Q_ROWS]; kv [KV_ROWS] in the cache's dtype (float32 for turbo_kv, whose
         key is quantized from float32): this token's k (n_kv_heads * HD) then v.
Template: IN, UNITS, BITS, HD, Q_ROWS (n_heads * HD), QK_ROWS (the rows RoPE turns). */
    const int unit = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    if (unit >= UNITS) return;
    fd_qkv_rope_unit<IN, BITS, HD, Q_ROWS, QK_ROWS>(unit, (int)(threadIdx.x & 31), x, nw, w,
                                                    FD_QUANT, pos, inv_freq, q, kv);
