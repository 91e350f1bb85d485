/* attend_merge_project.cu: the S partial softmaxes of each query head (attend.cu or
turbo_attend.cu with FD_SPLIT 1) merged, then that head's share of the output projection.

Per head h: M = max of the splits' maxima; o = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M)
(a split with no key, m_s = -inf, is skipped); then fd_project as in attend.cu.
Grid: NH blocks of max(128, HD) threads; thread d < HD merges element d.
Inputs:  splits float32 [NH * S * (HD + 2)], w [DIM, NH * HD] as in fd_dot, r float32 [DIM],
         part float32 [NH * DIM + 4].
Output:  out float32 [DIM] = r + W o.
Template: NH, HD, DIM, BITS. The body is fd_merge_project (fused_common.cuh). */
    const int S = (int)(splits_shape[0] / ((int)gridDim.x * (HD + 2)));
    fd_merge_project<NH, HD, DIM, BITS>((int)blockIdx.x, S, splits, w, FD_QUANT, r, part, out);
