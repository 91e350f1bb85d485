/* norm_qkv_rope.cu: RMSNorm, the fused Q|K|V matrix-vector product and RoPE, for one token.

Computes  y = Wqkv rms_norm(x) * nw, then RoPE on the q and k rows at position pos[0]: unit p
is rows 2p and 2p + 1, an adjacent pair (GGUF Llama's RoPE form), turned by the angle
pos * inv_freq[(2p % HD) / 2].
Grid: UNITS = (Q_ROWS + KV_ROWS) / 2 warps, blocks of 128 threads; one warp per pair of rows.
Inputs:  x float32 [IN], nw float32 [IN], w [Q_ROWS + KV_ROWS, IN] as in fd_dot,
         pos int32 [4] (the position in pos[0]: see fused_decode._kernel on scalars),
         inv_freq float32 [HD / 2] (0 past the rotated dimensions: the identity).
Outputs: q float32 [Q_ROWS]; kv [KV_ROWS] in the cache's dtype (float32 for turbo_kv, whose
         key is quantized from float32): this token's k (n_kv_heads * HD) then v.
Template: IN, UNITS, BITS, HD, Q_ROWS (n_heads * HD), QK_ROWS (the rows RoPE turns). */
    const int unit = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    const int lane = (int)(threadIdx.x & 31);
    if (unit >= UNITS) return;
    const int r0 = 2 * unit;
    float y[2], ss;
    fd_rows_dot<IN, 2, BITS>(w, FD_QUANT, r0, r0 + 1, x, nw, y, &ss, lane);
    if (lane != 0) return;
    const float inv = fd_inv_rms(ss, IN, FD_EPS);
    float y0 = y[0] * inv;
    float y1 = y[1] * inv;
    if (r0 < QK_ROWS) {
        const float theta = (float)pos[0] * inv_freq[(r0 % HD) / 2];
        float s, c;
        sincosf(theta, &s, &c);
        const float a = y0 * c - y1 * s;
        y1 = y0 * s + y1 * c;
        y0 = a;
    }
    if (r0 < Q_ROWS) {
        q[r0] = y0;
        q[r0 + 1] = y1;
    } else {
        fd_store(kv + (r0 - Q_ROWS), y0);
        fd_store(kv + (r0 - Q_ROWS + 1), y1);
    }
