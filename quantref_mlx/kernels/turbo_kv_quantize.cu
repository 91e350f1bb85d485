/* turbo_kv_quantize.cu: quant.cpp's turbo_kv key blocks, byte for byte (CUDA and Metal).

Per 128-element chunk of a key (one thread each, in quant.cpp's exact float32 order): the
sequential sum of squares, norm = sqrt, r = x / norm, the sign flip and Walsh-Hadamard butterfly
of the first n2 (a power of two) entries times 1 / sqrt(n2), s = CENT_MAX / max|r|, the first
nearest centroid of each r * s, packed LSB-first after the 8-byte header (truncating fp16 norm
and s). quantref/turbo_kv.py is the reference; tests/test_mlx_turbo_kv.py and
bench/turbo_kv_gpu_check.py check the bytes.
Grid: rows * NC threads (blocks of 128), one chunk each (``gid``, defined before this body).
Inputs:  x float32 [rows, D] (keys after RoPE); cent float32 [NLEV] (the kind's centroids).
Output:  out uint8 [rows, NC, BB] with NC = ceil(D / 128).
Template: BB (block bytes), BITS, NLEV; TK_CMAX #defined (the kind's CENT_MAX). */
    const int rows = x_shape[0];
    const int D = x_shape[1];
    const int NC = (D + 127) / 128;
    if (gid >= rows * NC) return;
    const int row = gid / NC;
    const int lo = (gid - row * NC) * 128;
    const int cd = D - lo < 128 ? D - lo : 128;
    int n2 = 1;
    while (n2 * 2 <= cd) n2 *= 2;

    float r[128];
    float ss = 0.0f;  /* sequential, as quant.cpp: ss = ss + x[i] * x[i] */
    for (int i = 0; i < cd; ++i) {
        const float v = x[row * D + lo + i];
        r[i] = v;
        ss = TK_ADD(ss, TK_MUL(v, v));
    }
    const float norm = TK_SQRT(ss);
    const float inv = norm > 1e-10f ? TK_DIV(1.0f, norm) : 0.0f;
    for (int i = 0; i < cd; ++i) r[i] = TK_MUL(r[i], inv);

    for (int i = 0; i < n2; i += 2) r[i] = -r[i];
    for (int len = 1; len < n2; len *= 2) {
        for (int g = 0; g < n2; g += 2 * len) {
            for (int j = 0; j < len; ++j) {
                const float u = r[g + j];
                const float w = r[g + j + len];
                r[g + j] = TK_ADD(u, w);
                r[g + j + len] = TK_SUB(u, w);
            }
        }
    }
    const float rs = TK_DIV(1.0f, TK_SQRT((float)n2));
    for (int i = 0; i < n2; ++i) r[i] = TK_MUL(r[i], rs);

    float m = 0.0f;
    for (int i = 0; i < cd; ++i) {
        const float a = TK_ABS(r[i]);
        m = a > m ? a : m;
    }
    if (m < 1e-10f) m = 1.0f;
    const float s = TK_DIV(TK_CMAX, m);

    unsigned int block[BB];
    for (int k = 0; k < BB; ++k) block[k] = 0u;
    const unsigned int hn = tk_f16_trunc(norm);
    const unsigned int hs = tk_f16_trunc(s);
    block[0] = hn & 0xFFu;
    block[1] = hn >> 8;
    block[4] = hs & 0xFFu;
    block[5] = hs >> 8;
    for (int i = 0; i < cd; ++i) {
        const float t = TK_MUL(r[i], s);
        int best = 0;
        float best_dist = TK_ABS(TK_SUB(t, cent[0]));
        for (int j = 1; j < NLEV; ++j) {
            const float dist = TK_ABS(TK_SUB(t, cent[j]));
            if (dist < best_dist) {
                best_dist = dist;
                best = j;
            }
        }
        const int bit = BITS * i;
        const int byte = 8 + (bit >> 3);
        const unsigned int v = ((unsigned int)best) << (bit & 7);
        block[byte] |= v & 0xFFu;
        if ((bit & 7) + BITS > 8) block[byte + 1] |= v >> 8;
    }
    for (int k = 0; k < BB; ++k) out[gid * BB + k] = (uint8_t)block[k];
