/* turbo_prefill_quantize.cu: a prefill chunk's keys as turbo_kv blocks, a warp per 128-element
chunk: the bytes of turbo_kv_quantize.cu (quant.cpp's), whose one thread per chunk walks 128
elements, a butterfly and a nearest-centroid search serially (latency-bound: a few hundred
threads for a chunk of T rows).

The steps and their float32 operations are the decode step's in-kernel quantize (checked byte
for byte on the GPU), one function for both: tk_warp_quantize (turbo_key.cuh). Whole power-of-two chunks only (CD = D below 128,
else 128 with D a multiple of 128: turbo_prefill.why_not's head sizes).
Grid: ceil(rows * NC / 4) blocks of 128 threads, a warp per (row, chunk).
Inputs:  x float32 [rows, D] (keys after RoPE).
Output:  out uint8 [rows, NC, BB].
Template: D, BB, KBITS, NLEV. The header #defines TK_CMAX and the __constant__ tk_cent
         (quantref_mlx.fused_decode.TurboSpec.header). */
    constexpr int CD = D < 128 ? D : 128;
    constexpr int NC = D / CD;
    const int rows = x_shape[0];
    const int warp = (int)(threadIdx.x >> 5);
    const int lane = (int)(threadIdx.x & 31);
    const int wid = (int)blockIdx.x * 4 + warp;
    __shared__ float sm_r[4][CD];
    __shared__ unsigned char sm_idx[4][CD];
    if (wid >= rows * NC) return;  /* the whole warp; no block-wide barrier follows */
    const int row = wid / NC;
    const int c = wid % NC;
    tk_warp_quantize<CD, NLEV, KBITS, BB>(x + (size_t)row * D + c * CD, sm_r[warp], sm_idx[warp],
                                          out + ((size_t)row * NC + c) * BB, lane);
