/* ffn.cu: the feed-forward half of a layer, out = x + W2 (silu(g) * u), with g, u the gate and
up rows of W times rms_norm(x) * nw.

Block b takes hidden units b * SL .. b * SL + SL - 1 (unit u: gate row u, up row H + u), one
warp per unit at a time, then its SL columns of the down projection W2 [IN, H] (fd_project:
the last block to finish sums every block's part, in block order, with the residual x);
fd_ffn in fused_common.cuh.
Grid: H / SL blocks of 512 threads (16 warps).
Inputs:  x float32 [IN], nw float32 [IN], w (gate|up [2H, IN]) and w2 (down [IN, H]) as in
         fd_dot, part float32 [H / SL * IN + 4] (the step's scratch: parts, then a counter).
Output:  out float32 [IN].
Template: IN, H, SL, BITS (of w), BITS2 (of w2). */
    fd_ffn<IN, H, SL, BITS, BITS2>((int)blockIdx.x, x, nw, w, FD_QUANT, w2, FD_QUANT2, part, out);
