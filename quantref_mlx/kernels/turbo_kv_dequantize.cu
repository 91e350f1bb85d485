/* turbo_kv_dequantize.cu: turbo_kv key blocks back to float32 keys, bit for bit as
quantref.turbo_kv.dequantize (CUDA and Metal).

Per chunk (one thread each): s = f16(inv_std) (sqrt(cd) when below 1e-10), y = C[idx] * (1/s),
times 1 / sqrt(n2), the butterfly, the sign flip, times f16(norm); one rounding per operation.
Grid: rows * NC threads (blocks of 128), one chunk each (``gid``, defined before this body).
Inputs:  blocks uint8 [rows, NC, BB]; cent float32 [NLEV].
Output:  out float32 [rows, D].
Template: BB, BITS, NLEV, D (the head's length: a constant, not a 4-byte input, which MLX's
CUDA backend would keep in managed memory; see fused_decode._kernel). */
    const int rows = blocks_shape[0];
    const int NC = blocks_shape[1];
    if (gid >= rows * NC) return;
    const int row = gid / NC;
    const int lo = (gid - row * NC) * 128;
    const int cd = D - lo < 128 ? D - lo : 128;
    int n2 = 1;
    while (n2 * 2 <= cd) n2 *= 2;
    const int base = gid * BB;

    const float norm = tk_f16_decode((unsigned int)blocks[base]
                                     | ((unsigned int)blocks[base + 1] << 8));
    float s = tk_f16_decode((unsigned int)blocks[base + 4]
                            | ((unsigned int)blocks[base + 5] << 8));
    if (s < 1e-10f) s = TK_SQRT((float)cd);
    const float step = TK_DIV(1.0f, s);

    float y[128];
    for (int i = 0; i < cd; ++i) {
        const int bit = BITS * i;
        const int byte = base + 8 + (bit >> 3);
        unsigned int w = (unsigned int)blocks[byte];
        if ((bit & 7) + BITS > 8) w |= (unsigned int)blocks[byte + 1] << 8;
        const unsigned int idx = (w >> (bit & 7)) & ((1u << BITS) - 1u);
        y[i] = TK_MUL(cent[idx], step);
    }
    const float rs = TK_DIV(1.0f, TK_SQRT((float)n2));
    for (int i = 0; i < n2; ++i) y[i] = TK_MUL(y[i], rs);
    for (int len = 1; len < n2; len *= 2) {
        for (int g = 0; g < n2; g += 2 * len) {
            for (int j = 0; j < len; ++j) {
                const float u = y[g + j];
                const float w = y[g + j + len];
                y[g + j] = TK_ADD(u, w);
                y[g + j + len] = TK_SUB(u, w);
            }
        }
    }
    for (int i = 0; i < n2; i += 2) y[i] = -y[i];
    for (int i = 0; i < cd; ++i) out[row * D + lo + i] = TK_MUL(y[i], norm);
