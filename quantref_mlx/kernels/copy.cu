/* copy.cu: a trivial kernel, out = x: what MLX itself costs per launched kernel, for the
benchmarks that chain it (bench/decode_phases.py, bench/fused_decode_check.py).

Grid: N threads (any block size); one element per thread.
Inputs:  x float32 [N].
Output:  out float32 [N].
Template: N. */
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i < N) out[i] = x[i];
