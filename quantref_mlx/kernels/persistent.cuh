/* persistent.cuh: what persistent.cu adds to fused_common.cuh: a grid-wide barrier whose wait is
bounded, and the small helpers of the greedy token.

FD_MAX_SPLITS and FD_SPLIT_KEYS (fused_decode.ATTEND_MAX_SPLITS, ATTEND_SPLIT_KEYS) and
FD_WAIT_NS (the longest a barrier waits, in ns) are #defined before this file.

The step's sync words (uint32, the scratch's first 96 elements, each group on its own 128-byte
line): bar[0] the grid barrier's arrivals, bar[1] the error flag, bar[32] the phase generation,
bar[64] a phase's arrivals. */

template <typename T> struct fd_elem { using type = T; };
template <typename T> struct fd_elem<const T*> { using type = T; };

__device__ __forceinline__ unsigned fd_volatile(const unsigned* p) {
    return *reinterpret_cast<const volatile unsigned*>(p);
}
__device__ __forceinline__ unsigned long long fd_now() {  /* ns, the GPU's global timer */
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
/* Splits per head of the attention, as FusedStep.attend_project chooses them. */
__device__ __forceinline__ int fd_splits(int cap) {
    return max(1, min(FD_MAX_SPLITS, cap / FD_SPLIT_KEYS));
}
/* Splits a head in the rows form for L positions (FD_ROW_KEYS > 0): one per FD_ROW_KEYS
   positions, at most FD_ROW_MAX_SPLITS (the scratch's room) and at most as many as give each of
   the nh heads' (or KV heads', fd_attend_group) splits a block of its own, so that attention is
   one round of the grid. */
__device__ __forceinline__ int fd_row_splits(int L, int nh) {
    const int most = max(1, min(FD_ROW_MAX_SPLITS, (int)gridDim.x / nh));
    return max(1, min(most, (L + FD_ROW_KEYS - 1) / max(1, FD_ROW_KEYS)));
}
/* Every head's attention output [NH * HD] into shared memory ``out``, merged from its S splits'
   partial softmaxes (splits [NH * S, HD + 2]) as fd_merge_splits merges them, the same sums in
   the same order (bit for bit), but with each split's weight e^(m_s - M) and each head's total
   taken once a block, not once an element, and each element's S loads in flight together (a
   loop of FD_ROW_MAX_SPLITS, unrolled): two round trips to L2, not 2 S. Called by every thread.
   Not inlined: its loads in flight would take a turbo_kv kernel past 128 registers a thread
   (the rows form's turbo_kv_4b then launched with 8 warps a block, not 16, on the H200). */
template <int NH, int HD>
__device__ __noinline__ void fd_merge_rows(const float* splits, int S, float* out) {
    const float NEG_INF = __int_as_float(0xff800000);
    __shared__ float sm_e[NH * FD_ROW_MAX_SPLITS];  /* the m_s, then the weights e^(m_s - M) */
    __shared__ float sm_l[NH * FD_ROW_MAX_SPLITS];
    __shared__ float sm_total[NH];
    for (int t = (int)threadIdx.x; t < NH * S; t += (int)blockDim.x) {
        sm_e[t] = splits[(size_t)t * (HD + 2) + HD];
        sm_l[t] = splits[(size_t)t * (HD + 2) + HD + 1];
    }
    __syncthreads();
    for (int h = (int)threadIdx.x; h < NH; h += (int)blockDim.x) {
        float M = NEG_INF;
        for (int s = 0; s < S; ++s) M = fmaxf(M, sm_e[h * S + s]);
        float total = 0.0f;
        for (int s = 0; s < S; ++s) {
            const float m = sm_e[h * S + s];
            const float e = m == NEG_INF ? 0.0f : expf(m - M);  /* a split that had no key */
            total += sm_l[h * S + s] * e;
            sm_e[h * S + s] = e;
        }
        sm_total[h] = total;
    }
    __syncthreads();
    for (int i = (int)threadIdx.x; i < NH * HD; i += (int)blockDim.x) {
        const int h = i / HD;
        const float* p = splits + (size_t)h * S * (HD + 2) + i % HD;
        float o = 0.0f;
#pragma unroll
        for (int s = 0; s < FD_ROW_MAX_SPLITS; ++s)
            if (s < S) o += p[(size_t)s * (HD + 2)] * sm_e[h * S + s];
        out[i] = o / sm_total[h];
    }
    __syncthreads();
}
/* The rows form's attention for float caches (FD_ROW_GROUP 1): one split of one KV head's keys
   for all G = NH / NKV query heads that share it (grouped-query attention), each key and value
   row read once for the G heads, where fd_attend reads it once a head; so each of the grid's
   blocks takes G times fewer keys for the same number of blocks. Block vb of NKV * S: KV head
   g = vb / S, split vb % S. Writes each head's partial softmax where fd_attend's split form
   would (out [NH * S, HD + 2], row h * S + split: fd_merge_rows merges them), with, per head,
   fd_attend's sums in fd_attend's order (the keys each warp takes, the dot products, the online
   softmax, the warps' merge): the same bits for the same S. Split 0 writes this token's key and
   value into the cache (kc, vc [NKV, cap, HD] of this layer), as fd_attend's. */
template <int NH, int NKV, int HD, int DPL, int NW, int U, typename KT>
__device__ void fd_attend_group(int vb, int S, const float* q, const KT* kv, const KT* kc,
                                const KT* vc, int cap, const int* pos, float* out) {
    constexpr int G = NH / NKV;
    const int g = vb / S;
    const int split = vb % S;
    const int warp = (int)(threadIdx.x >> 5);
    const int lane = (int)(threadIdx.x & 31);
    const int L = pos[0] + 1;
    const int chunk = (L + S - 1) / S;
    const int lo = split * chunk;
    const int hi = min(L, lo + chunk);
    const float NEG_INF = __int_as_float(0xff800000);
    __shared__ float sm_gm[NW * G];
    __shared__ float sm_gl[NW * G];
    __shared__ float sm_gacc[NW * G * HD];
    if (split == 0 && (int)threadIdx.x < HD) {
        const size_t at = ((size_t)g * cap + (L - 1)) * HD + threadIdx.x;
        fd_poke(kc + at, kv[g * HD + threadIdx.x]);
        fd_poke(vc + at, kv[(NKV + g) * HD + threadIdx.x]);
    }
    float qv[G][DPL], acc[G][DPL], m[G], l[G];
#pragma unroll
    for (int j = 0; j < G; ++j) {
        m[j] = NEG_INF;
        l[j] = 0.0f;
#pragma unroll
        for (int d = 0; d < DPL; ++d) {
            qv[j][d] = q[(g * G + j) * HD + lane * DPL + d] * FD_SCALE;
            acc[j][d] = 0.0f;
        }
    }
    const size_t base = (size_t)g * cap * HD + lane * DPL;
    for (int t0 = lo + warp; t0 < hi; t0 += NW * U) {
        float s[G][U];
        float vv[U][DPL];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = t0 + u * NW;
#pragma unroll
            for (int j = 0; j < G; ++j) s[j][u] = 0.0f;
            if (t < hi) {  /* uniform across the warp */
                const bool last = t == L - 1;  /* this token: from kv, not yet in the cache */
                const auto* kp = last ? kv + g * HD + lane * DPL : kc + base + (size_t)t * HD;
                const auto* vp = last ? kv + (NKV + g) * HD + lane * DPL
                                      : vc + base + (size_t)t * HD;
#pragma unroll
                for (int d = 0; d < DPL; ++d) {
                    const float k = fd_f(kp[d]);
#pragma unroll
                    for (int j = 0; j < G; ++j) s[j][u] += qv[j][d] * k;
                    vv[u][d] = fd_f(vp[d]);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < G; ++j) {
            float mn = m[j];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                s[j][u] = fd_sum(s[j][u]);
                if (t0 + u * NW < hi) mn = fmaxf(mn, s[j][u]);
            }
            const float c = expf(m[j] - mn);  /* 0 on a warp's first keys (m = -inf) */
            l[j] *= c;
#pragma unroll
            for (int d = 0; d < DPL; ++d) acc[j][d] *= c;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (t0 + u * NW < hi) {
                    const float p = expf(s[j][u] - mn);
                    l[j] += p;
#pragma unroll
                    for (int d = 0; d < DPL; ++d) acc[j][d] += p * vv[u][d];
                }
            }
            m[j] = mn;
        }
    }
#pragma unroll
    for (int j = 0; j < G; ++j) {
        if (lane == 0) {
            sm_gm[warp * G + j] = m[j];
            sm_gl[warp * G + j] = l[j];
        }
#pragma unroll
        for (int d = 0; d < DPL; ++d) sm_gacc[(warp * G + j) * HD + lane * DPL + d] = acc[j][d];
    }
    __syncthreads();
    for (int i = (int)threadIdx.x; i < G * HD; i += (int)blockDim.x) {
        const int j = i / HD;
        const int d = i % HD;
        float M = NEG_INF;
        for (int w = 0; w < NW; ++w) M = fmaxf(M, sm_gm[w * G + j]);
        float total = 0.0f;
        float o = 0.0f;
        for (int w = 0; w < NW; ++w) {
            if (sm_gm[w * G + j] == NEG_INF) continue;  /* a warp that had no key */
            const float e = expf(sm_gm[w * G + j] - M);
            total += sm_gl[w * G + j] * e;
            o += sm_gacc[(w * G + j) * HD + d] * e;
        }
        float* mine = out + ((size_t)(g * G + j) * S + split) * (HD + 2);
        mine[d] = o;
        if (d == 0) {
            mine[HD] = M;
            mine[HD + 1] = total;
        }
    }
}
/* (v, i) replaces (*bv, *bi) when larger, or equal with a smaller index: argmax's first index. */
__device__ __forceinline__ void fd_better(float v, int i, float* bv, int* bi) {
    if (v > *bv || (v == *bv && i < *bi)) {
        *bv = v;
        *bi = i;
    }
}
/* Spin while ``pending()``, at most FD_WAIT_NS: 1 when it stopped pending, 0 when the wait gave
   up (this one timed out and set the error flag bar[1], or saw another waiter's flag). One
   thread of a block calls it. */
template <typename Pending>
__device__ __forceinline__ int fd_bounded_wait(unsigned* bar, Pending pending) {
    const unsigned long long t0 = fd_now();
    while (pending()) {
        if (fd_volatile(bar + 1) != 0u) return 0;
        if (fd_now() - t0 > FD_WAIT_NS) {
            atomicExch(bar + 1, 1u);
            return 0;
        }
    }
    return 1;
}
/* Every block of the grid waits here until all have arrived; called by every thread. The
   counter bar[0] is cooperative groups' grid barrier: block 0 adds 0x80000000 - (blocks - 1),
   the others 1, so its top bit flips when the last block arrives and the low bits come back to
   where they were (nothing to reset between barriers or launches). Bounded: a wait longer than
   FD_WAIT_NS (a block that never started: the grid was not all resident) sets the error flag
   bar[1], and any waiter that sees the flag stops too; false then, and the kernel returns.
   FD_ACQREL 0: as cooperative groups, a fence, the arrival an atomic add whose old value says
   which way the top bit will flip, the wait volatile loads, a fence. FD_ACQREL 1: as CUTLASS's
   GenericBarrier, the arrival a reduction with release semantics and the wait loads with
   acquire semantics, neither a full fence nor a returned value to wait for; thread 0 then knows
   the top bit to wait for from ``*top`` (the bit it read at the kernel's start, before any
   arrival could flip it, toggled at each barrier). Either way each block's writes before the
   barrier are visible to every block after it. */
__device__ __forceinline__ bool fd_grid_sync(unsigned* bar, unsigned* top) {
    __shared__ int fd_ok;
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1u) : 1u;
#if FD_ACQREL
        asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(bar), "r"(add) : "memory");
        const unsigned want = (*top ^= 0x80000000u);
        const int ok = fd_bounded_wait(bar, [&] {
            unsigned now;
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(now) : "l"(bar) : "memory");
            return (now & 0x80000000u) != want;  /* not flipped yet */
        });
#else
        __threadfence();
        const unsigned old = atomicAdd(bar, add);
        const int ok = fd_bounded_wait(bar, [&] {
            return ((old ^ fd_volatile(bar)) & 0x80000000u) == 0u;  /* not flipped yet */
        });
        __threadfence();
#endif
        fd_ok = ok;
    }
    __syncthreads();
    return fd_ok != 0;
}

/* The end of a phase in the flags form (FD_FLAGS 1): only the P blocks that did the phase's work
   count themselves (bar[64]); the last of them resets the count and advances the generation
   bar[32], and every block, working or not, waits until the generation reaches ``target``
   (which it knows: the generation it read at its start plus the phases since). Fewer atomics
   than a grid barrier, and the waiters poll a line no arrival writes. Bounded as fd_grid_sync.
   Called by every thread. */
__device__ __forceinline__ bool fd_phase_end(unsigned* bar, bool participant, unsigned P,
                                             unsigned target) {
    __shared__ int fd_ok2;
    __syncthreads();
    if (threadIdx.x == 0) {
        int ok = 1;
        if (participant) {
            __threadfence();
            if (atomicAdd(bar + 64, 1u) == P - 1u) {  /* the last: all P have written */
                atomicExch(bar + 64, 0u);
                __threadfence();
                atomicAdd(bar + 32, 1u);
            }
        }
        ok = fd_bounded_wait(bar, [&] { return (int)(fd_volatile(bar + 32) - target) < 0; });
        __threadfence();
        fd_ok2 = ok;
    }
    __syncthreads();
    return fd_ok2 != 0;
}

/* Bring bytes [p, p + bytes) toward L2 (prefetch.global.L2, one per 128-byte line), this
   thread's share of ``parts`` (``part`` = its rank): the blocks a phase leaves idle fetch what
   the next phase will read, so that it waits on L2, not on memory. No value changes. */
__device__ __forceinline__ void fd_prefetch(const void* p, size_t bytes, int part, int parts) {
    const char* c = static_cast<const char*>(p);
    for (size_t at = (size_t)part * 128; at < bytes; at += (size_t)parts * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(c + at));
}

/* This layer's W gate|up [2H, DIM] and W down [DIM, H] (codes, scales, biases) toward L2, by the
   blocks ``first`` .. gridDim.x - 1 (the ones a phase left idle). */
template <int DIM, int H, int BGU, int BDN>
__device__ __forceinline__ void fd_prefetch_ffn(int first, const uint32_t* wgu, const float* sgu,
                                                const float* bgu, const uint32_t* wdn,
                                                const float* sdn, const float* bdn) {
    const int b = (int)blockIdx.x;
    if (b < first) return;
    const int part = (b - first) * (int)blockDim.x + (int)threadIdx.x;
    const int parts = ((int)gridDim.x - first) * (int)blockDim.x;
    fd_prefetch(wgu, (size_t)2 * H * DIM * BGU / 8, part, parts);
    fd_prefetch(sgu, (size_t)2 * H * DIM / 32 * 4, part, parts);
    fd_prefetch(bgu, (size_t)2 * H * DIM / 32 * 4, part, parts);
    fd_prefetch(wdn, (size_t)DIM * H * BDN / 8, part, parts);
    fd_prefetch(sdn, (size_t)DIM * H / 32 * 4, part, parts);
    fd_prefetch(bdn, (size_t)DIM * H / 32 * 4, part, parts);
}
