/* norm_matvec.cu: the logits, out = W rms_norm(x) * nw.

Computes  out[u] = (W[u] . (x * nw)) / sqrt(mean(x^2) + eps)  for u < UNITS (RMSNorm's factor
applied after the dot product: the same product in another order; fd_norm_row).
Grid: UNITS warps, blocks of 128 threads (4 warps); one warp per output unit.
Inputs:  x float32 [IN], nw float32 [IN] (the norm's weight), w [UNITS, IN] as in fd_dot.
Output:  out float32 [UNITS].
Template: IN, UNITS, BITS. */
    const int unit = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    if (unit >= UNITS) return;
    const float y = fd_norm_row<IN, BITS>(unit, (int)(threadIdx.x & 31), x, nw, w, FD_QUANT);
    if ((threadIdx.x & 31) == 0) out[unit] = y;
