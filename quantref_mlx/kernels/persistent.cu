/* persistent.cu: a whole decode step (every layer, the final norm, the logits and the greedy
token) in one launch, the fused step's kernels run one after another by the same blocks with a
grid-wide barrier between dependent phases.

What it computes: exactly what quantref_mlx.fused_decode.FusedStep's ~95 kernels compute, with
the same functions (fused_common.cuh) on the same block indices, so the same sums in the same
order: the logits are the fused step's bit for bit. Per token:
  x = embedding row of the token (token[0], then each step's argmax)      (phase E)
  per layer l: q, k, v = RoPE(Wqkv rms_norm(x))        fd_qkv_rope_unit, one warp per unit
               x' = x + Wo attention(q, cache, k, v)   fd_attend, or fd_turbo_attend for a turbo_kv
                                                       cache (+ fd_merge_project when the capacity
                                                       splits a head: one more phase)
               x  = x' + W2 (silu(g) * u)              fd_ffn, one virtual block per SL units
  logits = Wout rms_norm(x) * nw; token = the first index of the largest logit.
A virtual block of a fused kernel (block vb of its grid) is taken by block vb % gridDim.x, in
turn; between phases every block waits at fd_grid_sync. The fd_project sums keep their
"last block finishes" form (a counter in the scratch, reset by that block).

FD_STEPS tokens a launch (greedy decoding): the token above, then its argmax fed back in as the
next token at the next position, FD_STEPS - 1 times (block 0's argmax in the scratch, bar[48],
read by every block after one more barrier), so that MLX's cost per launch is paid once for
them all. Measured slower than one token a launch (docs/benchmarks.md section 3): Decoder
asks for 1 unless told otherwise.

Grid: gridDim.x blocks, at most one per SM, so that all are resident at once (a barrier waits
for every block); 512 threads (NW = 16 warps, as the fused attention and ffn kernels).
Inputs:  token int32 [4] (the id in token[0]: the previous step's output), pos int32 [4]
         (L - 1 in pos[0]), wemb (with wemb_scales, wemb_biases when quantized: the embedding, as
         in fd_weight), onw float32 [DIM] (the final norm's weight), wout (and wout_scales,
         wout_biases: the output matrix [VOCAB, DIM]), lnw float32 [NL, 2, DIM] (attn_norm, ffn_norm per layer), codes uint32,
         scales float32, biases float32 (every layer's four quantized matrices, concatenated),
         woff int64 [NL, 4, 2] (per layer and matrix - Wqkv, Wo, W gate|up, W down - the offset of
         its codes and of its scales / biases, in elements), inv_freq float32 [HD / 2],
         kc, vc [NL, NKV, CAP, HD] float32 or float16 (positions < L - 1 filled; this token's k
         and v are written at L - 1, in place); with FD_TURBO 1 kc uint8 [NL, NKV, CAP, NC, BB]
         (turbo_kv blocks) and vc the values' storage [NL, NKV, CAP, HD or VB] (turbo_attend.cu), scratch float32 [FD_SCRATCH] (the step's own:
         the barrier counter and error flag, the fd_project parts and counters, activations;
         zero at creation, left ready for the next launch).
Outputs: logits float32 [FD_STEPS, VOCAB] (each token's); next int32 [4 + FD_STEPS]: next[4 + s]
         the greedy token of step s (-1 where not reached), next[0] the last one (the next
         launch's token[0]), next[1] 0; or on failure next[0] = -1 and next[1] the reason:
         1 a barrier waited past FD_WAIT_NS (the blocks were not all resident: another kernel
         held SMs), 2 token[0] out of range, 3 an earlier launch failed (the scratch's error
         flag is set: the host makes a new one). pos[0] + FD_STEPS - 1 < CAP (the host's).
FD_ROWS 1: the rows form (see below): every projection one output row per warp over the grid.
FD_FLAGS 1: phases end with fd_phase_end (persistent.cuh) instead of a grid barrier.
FD_ACQREL 1: the grid barrier's arrival a release reduction, its wait acquire loads (persistent.cuh).
FD_TIMES 1 (bench/decode_phases.py only): block 0 also writes the global timer at its start and
         as it leaves each barrier into the scratch after the argmax slots (uint64, ns), and
         every block its own start after those 5 NL + 4 marks, then (FD_MAX_BLOCKS slots on)
         its arrival at the first barrier.
Template: DIM, NL, NH, NKV, HD, DPL, NW, U, H, SL, VOCAB, BQKV, BO, BGU, BDN (the four matrices'
         bits, 4 or 8), EBITS, OBITS (embedding, output: 0 float, 4 or 8); FD_TURBO 1 also
         KBITS, BB, NC, NLEV, PATH, VT, VB, W (TurboSpec.template; W 0: no k-window). */
    constexpr int Q_ROWS = NH * HD;
    constexpr int KV_ROWS = 2 * NKV * HD;
    constexpr int UNITS = (Q_ROWS + KV_ROWS) / 2;
    constexpr int FB = H / SL;  /* ffn's virtual blocks */
    /* the scratch, in float32 elements (every region 16-byte aligned, for float4 loads) */
    constexpr int OFF_PA = 96;                             /* attention's fd_project parts */
    constexpr int OFF_PF = OFF_PA + NH * DIM + 4;          /* ffn's fd_project parts */
    constexpr int OFF_XA = OFF_PF + FB * DIM + 4;          /* the residual stream, ... */
    constexpr int OFF_XB = OFF_XA + DIM;                   /* ... and after attention */
    constexpr int OFF_Q = OFF_XB + DIM;
    constexpr int OFF_KV = OFF_Q + Q_ROWS;                 /* in the cache's dtype */
    static_assert(FD_ROW_MAX_SPLITS >= FD_MAX_SPLITS, "the rows form merges the fused form's S");
    static_assert(FD_STEPS >= 1 && (FD_STEPS == 1 || !FD_TIMES), "the timer marks: one token");
    constexpr int MAXS = FD_ROW_MAX_SPLITS;
    constexpr int OFF_SPLITS = OFF_KV + KV_ROWS;           /* NH * MAXS * (HD + 2) */
    constexpr int OFF_BEST = OFF_SPLITS + ((NH * MAXS * (HD + 2) + 3) / 4) * 4;
#if FD_TURBO
    using KT = float;  /* this token's k and v: turbo_kv quantizes the key from float32 */
#else
    using KT = typename fd_elem<decltype(kc)>::type;  /* float or __half: the cache's */
#endif
    float* sp = const_cast<float*>(scratch);
    unsigned* bar = reinterpret_cast<unsigned*>(sp);      /* the sync words: persistent.cuh */
    float* xa = sp + OFF_XA;
    float* xb = sp + OFF_XB;
    float* qv = sp + OFF_Q;
    KT* kvt = reinterpret_cast<KT*>(sp + OFF_KV);
    float* splits = sp + OFF_SPLITS;
    float* best = sp + OFF_BEST;                           /* per block: value, index */
    /* FD_TIMES 1 (bench/decode_phases.py): block 0 notes the global timer (ns) as it leaves
       each barrier, after the first, in times[1 ..]; times[0] at its start */
    unsigned long long* times = reinterpret_cast<unsigned long long*>(sp + OFF_BEST + 2 * FD_MAX_BLOCKS);
    int mark = 1;
    /* FD_PHASE(P): the end of a phase whose work the blocks b < P did: a grid barrier, or with
       FD_FLAGS 1 fd_phase_end (the generation to wait for: g0 plus the phases so far) */
    unsigned g0 = 0u, phase = 0u;
    unsigned top = 0u;  /* FD_ACQREL 1: the grid barrier's top bit now (fd_grid_sync) */
#define FD_MARK()                                                                     \
    do {                                                                              \
        if (FD_TIMES && b == 0 && threadIdx.x == 0) times[mark] = fd_now();           \
        ++mark;                                                                       \
    } while (0)
#if FD_FLAGS
#define FD_PHASE(P)                                                                   \
    do {                                                                              \
        const int p_ = min((int)(P), nb);                                             \
        if (!fd_phase_end(bar, b < p_, (unsigned)p_, g0 + ++phase)) goto failed;      \
        FD_MARK();                                                                    \
    } while (0)
#else
#define FD_PHASE(P)                                                                   \
    do {                                                                              \
        if (!fd_grid_sync(bar, &top)) goto failed;                                    \
        FD_MARK();                                                                    \
    } while (0)
#endif
    const int nb = (int)gridDim.x;
    const int b = (int)blockIdx.x;
    const int warp = (int)(threadIdx.x >> 5);
    const int lane = (int)(threadIdx.x & 31);
    const int gw = b * NW + warp;  /* this warp among all the grid's */
    const int nwarps = nb * NW;
    const int cap = kc_shape[2];
    const int S = fd_splits(cap);  /* as FusedStep: one block per head up to 256 of capacity */
#if FD_ROWS
    /* the rows form's splits a head: one per FD_ROW_KEYS positions, as many as keep every
       (head, split) on a block of its own (one round); FD_ROW_KEYS 0: the fused form's S */
    /* FD_ROW_GROUP 1 (float caches): a split a KV head, for its G query heads (fd_attend_group),
       whose shared memory (NW G HD floats) must fit beside the rest */
    constexpr bool GROUP = FD_ROW_GROUP && !FD_TURBO && NW * (NH / NKV) * HD <= 4096;
#endif
    int tok = token[0];
    int fail = 0;
    if (tok < 0 || tok >= VOCAB) fail = 2;
    else if (fd_volatile(bar + 1) != 0u) fail = 3;
    if (b == 0 && threadIdx.x == 0) {  /* no token yet: -1 until each is decided */
        next[0] = -1;
        next[1] = fail;
        for (int s = 0; s < FD_STEPS; ++s) next[4 + s] = -1;
    }
    if (fail) return;  /* every block returns here (the same token, the same flag): none waits */

    if (FD_TIMES && threadIdx.x == 0) {  /* block 0's start; every block's, after the marks */
        const unsigned long long now = fd_now();
        if (b == 0) times[0] = now;
        times[5 * NL + 4 + b] = now;  /* after the 5 NL + 4 marks (PersistentStep.max_marks) */
    }
    /* the generation every block starts from: read before the first barrier, which no block
       passes before all have read it, and nothing advances it before that */
    g0 = fd_volatile(bar + 32);
    top = fd_volatile(bar) & 0x80000000u;  /* likewise: no barrier flips it before all read */
    /* FD_STEPS tokens, each the last one's greedy successor, at positions pos[0], pos[0] + 1,
       ...: every function below reads the position from cur[0] (this block's shared copy) */
    __shared__ int cur[4];
    /* (a loop of known count: with FD_STEPS 1 it is no loop at all, and the registers are the
       one-token kernel's; FD_STEPS 8 takes 128 a thread with a float cache, 168 with turbo_kv,
       past what 16 warps a block may have: PersistentStep._probe then falls back to 8) */
#pragma unroll 1
    for (int step = 0; step < FD_STEPS; ++step) {
    if (threadIdx.x == 0) cur[0] = pos[0] + step;
    __syncthreads();
#if FD_ROWS
    const int SR = FD_ROW_KEYS ? fd_row_splits(cur[0] + 1, GROUP ? NKV : NH) : S;
#endif
    /* E: the embedding row */
    for (int i = b * (int)blockDim.x + (int)threadIdx.x; i < DIM; i += nb * (int)blockDim.x)
        xa[i] = fd_weight<DIM, EBITS>(wemb, FD_QUANT_E, (size_t)tok, i);
    if (FD_TIMES) {  /* every block's arrival at the first barrier, after the starts */
        __syncthreads();
        if (threadIdx.x == 0) times[5 * NL + 4 + FD_MAX_BLOCKS + b] = fd_now();
    }
    if (!fd_grid_sync(bar, &top)) goto failed;
    FD_MARK();

    for (int layer = 0; layer < NL; ++layer) {
        const int64_t* off = woff + layer * 8;
        const uint32_t* wqkv = codes + off[0];
        const uint32_t* wo = codes + off[2];
        const uint32_t* wgu = codes + off[4];
        const uint32_t* wdn = codes + off[6];
        const float* nw_attn = lnw + (size_t)layer * 2 * DIM;
        const float* nw_ffn = nw_attn + DIM;
#if FD_TURBO  /* blocks [NKV, CAP, NC, BB] and values [NKV, CAP, HD or VB] a layer */
        const auto* kcl = kc + layer * ((size_t)NKV * cap * NC * BB);
        const auto* vcl = vc + layer * ((size_t)NKV * cap * (VT >= 2 ? VB : HD));
#else
        const KT* kcl = kc + layer * ((size_t)NKV * cap * HD);
        const KT* vcl = vc + layer * ((size_t)NKV * cap * HD);
#endif

        /* Attention in its split form (both forms take it: the rows form always, the fused
           form for turbo_kv or past one split a head): the S splits' partial softmaxes of every
           head into the scratch's splits, block vb of NH * S taken by block vb % gridDim.x. */
        constexpr int UA = FD_ROWS ? FD_ROW_UNROLL : U;  /* keys a warp loads at once */
        auto attend_splits = [&](int n_splits) {
            for (int vb = b; vb < NH * n_splits; vb += nb) {
#if FD_TURBO
                fd_turbo_attend_apart<NH, NKV, HD, DPL, NW, UA, KBITS, BB, NC, NLEV, PATH, VT,
                                      VB>(vb, NH * n_splits, qv, kvt, kcl, vcl, cap, cur, splits);
#else
                fd_attend<NH, NKV, HD, DPL, NW, UA, true, 0, 0>(
                    vb, NH * n_splits, qv, kvt, kcl, vcl, cap, cur, (const float*)nullptr,
                    (const float*)nullptr, (const float*)nullptr, (const float*)nullptr,
                    (const float*)nullptr, splits);
#endif
                __syncthreads();  /* the block's shared memory, free for its next index */
            }
        };

        for (int unit = gw; unit < UNITS; unit += nwarps)
            fd_qkv_rope_unit<DIM, BQKV, HD, Q_ROWS, Q_ROWS + KV_ROWS / 2>(
                unit, lane, xa, nw_attn, wqkv, scales + off[1], biases + off[1], cur, inv_freq,
                qv, kvt);
        {   /* the idle blocks: this layer's cached keys and values (what attention reads) and
               Wo toward L2 */
            const int first = (UNITS + NW - 1) / NW;
            if (b >= first) {
                const int part = (b - first) * (int)blockDim.x + (int)threadIdx.x;
                const int parts = (nb - first) * (int)blockDim.x;
                const int L = cur[0];  /* the positions already in the cache */
#if FD_TURBO
                constexpr int KROW = NC * BB;  /* bytes a position, a KV head */
                constexpr int VROW = (VT >= 2 ? VB : HD * (VT == 0 ? 4 : 2));
#else
                constexpr int KROW = HD * (int)sizeof(KT);
                constexpr int VROW = KROW;
#endif
                for (int g = 0; g < NKV; ++g) {
                    fd_prefetch(reinterpret_cast<const char*>(kcl) + (size_t)g * cap * KROW,
                                (size_t)L * KROW, part, parts);
                    fd_prefetch(reinterpret_cast<const char*>(vcl) + (size_t)g * cap * VROW,
                                (size_t)L * VROW, part, parts);
                }
                fd_prefetch(wo, (size_t)DIM * Q_ROWS * BO / 8, part, parts);
                fd_prefetch(scales + off[3], (size_t)DIM * Q_ROWS / 32 * 4, part, parts);
                fd_prefetch(biases + off[3], (size_t)DIM * Q_ROWS / 32 * 4, part, parts);
            }
        }
        FD_PHASE((UNITS + NW - 1) / NW);

#if !FD_ROWS
        /* turbo_kv: always the split form, whose merge of one split is exact (e^0 = 1: the same
           bits as the one-pass form) and which keeps the kernel within 128 registers a thread
           (the one-pass form with its projection inlined takes 156 with turbo_kv_5b's dequant
           path, and 512 threads an SM cannot have more than 128) */
#if !FD_TURBO
        if (S == 1) {
            for (int vb = b; vb < NH; vb += nb) {
                fd_attend<NH, NKV, HD, DPL, NW, U, false, DIM, BO>(
                    vb, NH, qv, kvt, kcl, vcl, cap, cur, wo, scales + off[3], biases + off[3], xa,
                    sp + OFF_PA, xb);
                __syncthreads();  /* the block's shared memory, free for its next index */
            }
        } else
#endif
        {
            attend_splits(S);
            FD_PHASE(NH * S);
            for (int h = b; h < NH; h += nb) {
                fd_merge_project<NH, HD, DIM, BO>(h, S, splits, wo, scales + off[3],
                                                  biases + off[3], xa, sp + OFF_PA, xb);
                __syncthreads();
            }
        }
        /* the blocks attention left idle (the merge's are the first NH: the same idle ones) */
        fd_prefetch_ffn<DIM, H, BGU, BDN>(min(nb, NH * S), wgu, scales + off[5], biases + off[5],
                                          wdn, scales + off[7], biases + off[7]);
        FD_PHASE(NH);

        for (int vb = b; vb < FB; vb += nb) {
            fd_ffn<DIM, H, SL, BGU, BDN>(vb, xb, nw_ffn, wgu, scales + off[5], biases + off[5],
                                         wdn, scales + off[7], biases + off[7], sp + OFF_PF, xa);
            __syncthreads();
        }
        if (b >= FB) {  /* the idle blocks: the next layer's Wqkv (after the last, the output
                           matrix) toward L2 */
            const int part = (b - FB) * (int)blockDim.x + (int)threadIdx.x;
            const int parts = (nb - FB) * (int)blockDim.x;
            if (layer + 1 < NL) {
                const int64_t* nxt = woff + (layer + 1) * 8;
                fd_prefetch(codes + nxt[0], (size_t)(Q_ROWS + KV_ROWS) * DIM * BQKV / 8, part,
                            parts);
                fd_prefetch(scales + nxt[1], (size_t)(Q_ROWS + KV_ROWS) * DIM / 32 * 4, part,
                            parts);
                fd_prefetch(biases + nxt[1], (size_t)(Q_ROWS + KV_ROWS) * DIM / 32 * 4, part,
                            parts);
            } else if (OBITS) {
                fd_prefetch(wout, (size_t)VOCAB * DIM * OBITS / 8, part, parts);
                fd_prefetch(FD_OUT_SCALES, (size_t)VOCAB * DIM / 32 * 4, part, parts);
                fd_prefetch(FD_OUT_BIASES, (size_t)VOCAB * DIM / 32 * 4, part, parts);
            }
        }
        FD_PHASE(FB);
#else
        /* The rows form (FD_ROWS 1): attention in its split form only (partial softmaxes of
           S splits a head), then every projection one output row per warp over the whole grid,
           each a phase of its own: Wo (its input, the heads' outputs, merged by each block into
           shared memory as fd_merge_project merges them), gate|up, down. The fused step's
           projections split by columns among a few blocks, one of which sums them; here all
           the SMs work on each, and the dependent steps of a phase are fewer. The sums run in
           another order than the fused step's: logits within rounding of its, not bit for
           bit. The gate|up outputs live in the splits' scratch, free by then. */
        static_assert(H <= NH * MAXS * (HD + 2), "h lives in the splits' scratch");
        const int units = (GROUP ? NKV : NH) * SR;  /* attention's blocks */
#if !FD_TURBO
        if (GROUP) {
            for (int vb = b; vb < units; vb += nb) {
                fd_attend_group<NH, NKV, HD, DPL, NW, UA>(vb, SR, qv, kvt, kcl, vcl, cap, cur,
                                                          splits);
                __syncthreads();  /* the block's shared memory, free for its next index */
            }
        } else
#endif
            attend_splits(SR);
        /* the idle blocks: this layer's W gate|up and W down toward L2 */
        fd_prefetch_ffn<DIM, H, BGU, BDN>(min(nb, units), wgu, scales + off[5],
                                          biases + off[5], wdn, scales + off[7], biases + off[7]);
        FD_PHASE(units);
        {   /* Wo: each block merges the heads' splits into shared memory, then rows */
            __shared__ __align__(16) float sm_att[Q_ROWS];
            fd_merge_rows<NH, HD>(splits, SR, sm_att);
            for (int row = gw; row < DIM; row += nwarps) {
                float y[2];
                fd_rows_dot<Q_ROWS, 1, BO>(wo, scales + off[3], biases + off[3], row, row, sm_att,
                                           nullptr, y, nullptr, lane);
                if (lane == 0) xb[row] = xa[row] + y[0];
            }
        }
        FD_PHASE(nb);
        for (int unit = gw; unit < H; unit += nwarps) {  /* gate|up, SwiGLU: h into the splits */
            float y[2], ss;
            fd_rows_dot<DIM, 2, BGU>(wgu, scales + off[5], biases + off[5], unit, H + unit, xb,
                                     nw_ffn, y, &ss, lane);
            if (lane == 0) {
                const float inv = fd_inv_rms(ss, DIM, FD_EPS);
                const float g = y[0] * inv;
                splits[unit] = g / (1.0f + expf(-g)) * (y[1] * inv);
            }
        }
        FD_PHASE(nb);
        for (int row = gw; row < DIM; row += nwarps) {  /* down, with the residual */
            float y[2];
            fd_rows_dot<H, 1, BDN>(wdn, scales + off[7], biases + off[7], row, row, splits,
                                   nullptr, y, nullptr, lane);
            if (lane == 0) xa[row] = xb[row] + y[0];
        }
        FD_PHASE(nb);
#endif
    }

    {   /* the logits, two rows at a time (their loads in flight together; each row's sum as
           fd_norm_row's), and each warp's first largest one */
        float bv = __int_as_float(0xff800000);
        int bi = 0x7fffffff;
        for (int u0 = gw; u0 < VOCAB; u0 += 2 * nwarps) {
            const int u1 = u0 + nwarps < VOCAB ? u0 + nwarps : u0;
            float y[2], ss;
            fd_rows_dot<DIM, 2, OBITS>(wout, FD_QUANT_O, u0, u1, xa, onw, y, &ss, lane);
            const float inv = fd_inv_rms(ss, DIM, FD_EPS);
            const float y0 = y[0] * inv;
            const float y1 = y[1] * inv;
            if (lane == 0) {
                logits[(size_t)step * VOCAB + u0] = y0;
                logits[(size_t)step * VOCAB + u1] = y1;
            }
            if (y0 > bv) {  /* units rise along the loop: the first of equals stays */
                bv = y0;
                bi = u0;
            }
            if (u1 != u0 && y1 > bv) {
                bv = y1;
                bi = u1;
            }
        }
        __shared__ float sm_bv[NW];
        __shared__ int sm_bi[NW];
        if (lane == 0) {
            sm_bv[warp] = bv;
            sm_bi[warp] = bi;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < NW; ++w) fd_better(sm_bv[w], sm_bi[w], &bv, &bi);
            best[2 * b] = bv;
            best[2 * b + 1] = __int_as_float(bi);
        }
        FD_PHASE(nb);
        if (b == 0) {  /* the blocks' bests: a thread each, then the warps', then the block's
                          (the largest value, and of equals the smallest index, in any order) */
            float v = __int_as_float(0xff800000);
            int i = 0x7fffffff;
            for (int o = (int)threadIdx.x; o < nb; o += (int)blockDim.x)
                fd_better(best[2 * o], __float_as_int(best[2 * o + 1]), &v, &i);
            for (int o = 16; o > 0; o >>= 1)
                fd_better(__shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o),
                          &v, &i);
            __syncthreads();  /* sm_bv, sm_bi free again */
            if (lane == 0) {
                sm_bv[warp] = v;
                sm_bi[warp] = i;
            }
            __syncthreads();
            if (threadIdx.x == 0) {
                for (int w = 1; w < NW; ++w) fd_better(sm_bv[w], sm_bi[w], &v, &i);
                next[0] = i;  /* the next launch's input */
                next[4 + step] = i;
                bar[48] = (unsigned)i;  /* for every block's next token (the generation's line) */
            }
        }
    }
    if (step + 1 < FD_STEPS) {  /* the next token: block 0's argmax, once all have it */
        FD_PHASE(1);
        tok = (int)fd_volatile(bar + 48);
    }
    }  /* the steps */
    return;
failed:
    if (threadIdx.x == 0) {
        next[0] = -1;
        next[1] = 1;
    }
