/* embed.cu: the embedding row of one token, dequantized.

Computes  out[i] = W[token[0], i]  for i < IN, W a float or MLX-quantized weight (see fd_weight).
Grid: IN threads (blocks of min(IN, 256)); one element per thread.
Inputs:  token int32 [1]; w: float32/float16 [vocab, IN], or uint32 [vocab, IN * BITS / 32]
         with scales, biases float32 [vocab, IN / 32] (BITS 4 or 8).
Output:  out float32 [IN].
Template: IN, BITS (0: a float weight). */
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= IN) return;
    out[i] = fd_weight<IN, BITS>(w, FD_QUANT, (size_t)token[0], i);
