/* ffn.cu: the feed-forward half of a layer, out = x + W2 (silu(g) * u), with g, u the gate and
up rows of W times rms_norm(x) * nw.

Block b takes hidden units b * SL .. b * SL + SL - 1 (unit u: gate row u, up row H + u), one
warp per unit at a time, then its SL columns of the down projection W2 [IN, H] (fd_project:
the last block to finish sums every block's part, in block order, with the residual x).
Grid: H / SL blocks of 512 threads (16 warps).
Inputs:  x float32 [IN], nw float32 [IN], w (gate|up [2H, IN]) and w2 (down [IN, H]) as in
         fd_dot, part float32 [H / SL * IN + 4] (the step's scratch: parts, then a counter).
Output:  out float32 [IN].
Template: IN, H, SL, BITS (of w), BITS2 (of w2). */
    const int warp = (int)(threadIdx.x >> 5);
    const int lane = (int)(threadIdx.x & 31);
    __shared__ float sm_h[SL];
    for (int u = warp; u < SL; u += (int)(blockDim.x >> 5)) {
        const int unit = (int)blockIdx.x * SL + u;
        float y[2], ss;
        fd_rows_dot<IN, 2, BITS>(w, FD_QUANT, unit, H + unit, x, nw, y, &ss, lane);
        if (lane == 0) {
            const float inv = fd_inv_rms(ss, IN, FD_EPS);
            const float g = y[0] * inv;
            sm_h[u] = g / (1.0f + expf(-g)) * (y[1] * inv);
        }
    }
    __syncthreads();
    fd_project<IN, H, SL, H / SL, BITS2>(w2, FD_QUANT2, (int)blockIdx.x * SL, sm_h,
                                         (int)blockIdx.x, part, x, out);
