/* attend_merge_project.cu: the S partial softmaxes of each query head (attend.cu or
turbo_attend.cu with FD_SPLIT 1) merged, then that head's share of the output projection.

Per head h: M = max of the splits' maxima; o = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M)
(a split with no key, m_s = -inf, is skipped); then fd_project as in attend.cu.
Grid: NH blocks of max(128, HD) threads; thread d < HD merges element d.
Inputs:  splits float32 [NH * S * (HD + 2)], w [DIM, NH * HD] as in fd_dot, r float32 [DIM],
         part float32 [NH * DIM + 4].
Output:  out float32 [DIM] = r + W o.
Template: NH, HD, DIM, BITS. */
    const int h = (int)blockIdx.x;
    const int d = (int)threadIdx.x;
    const int S = (int)(splits_shape[0] / ((int)gridDim.x * (HD + 2)));
    const float NEG_INF = __int_as_float(0xff800000);
    __shared__ float sm_o[HD];
    if (d < HD) {
        const float* p = splits + (size_t)h * S * (HD + 2);
        float M = NEG_INF;
        for (int s = 0; s < S; ++s) M = fmaxf(M, p[s * (HD + 2) + HD]);
        float total = 0.0f;
        float o = 0.0f;
        for (int s = 0; s < S; ++s) {
            const float m = p[s * (HD + 2) + HD];
            if (m == NEG_INF) continue;  /* a split that had no key */
            const float e = expf(m - M);
            total += p[s * (HD + 2) + HD + 1] * e;
            o += p[s * (HD + 2) + d] * e;
        }
        sm_o[d] = o / total;
    }

    __syncthreads();
    fd_project<DIM, NH * HD, HD, NH, BITS>(w, FD_QUANT, h * HD, sm_o, h, part, r, out);
