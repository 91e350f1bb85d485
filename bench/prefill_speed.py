"""Prefill speed of turbo_kv caches against fp16, in one run: the whole prefill and its
attention kernel alone, for several shapes of ``turbo_prefill_attend.cu``'s blocks.

At each context C a fresh cache is prefilled with C random tokens in chunks of ``--chunk``
(random 4-bit weights of SmolLM2-135M's shapes, as ``bench/decode_speed.py``), ``--repeat``
times; the median is reported, with fp16's median from the same run beside it (issue 9's
target: turbo_kv prefill at least 0.8x fp16's). The kernel column times
``quantref_mlx.turbo_prefill.attend`` alone for the context's last chunk (its queries at
positions C - chunk .. C - 1 against the C stored keys), chained ``--kernel-reps`` times, one
evaluation: the kernel's cost without the rest of the layer, plus the small element-wise
operation that chains each call to the last (the same for every shape: fine to rank them).

    python bench/prefill_speed.py --contexts 128,1024,4096,8192 --variants auto,4x10,16x10

A variant is ``auto`` (``quantref_mlx.turbo_prefill._shape``'s rule, the default), ``autoP`` (the
rule with P queries a warp) or ``NWxROWS`` (warps and rows a block, forced).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from _common import machine


def prefill_tps(model, kv: str, ctx: int, chunk: int, repeat: int) -> float:
    """Median prefill tokens/s of ``ctx`` tokens into a fresh cache (one evaluation a chunk)."""
    import mlx.core as mx

    ids = np.random.default_rng(ctx).integers(0, model.args.vocab_size, ctx).tolist()
    warm = model.make_cache(kv)  # untimed: a kernel's first use compiles it
    mx.eval(model.forward(ids[:min(ctx, chunk)], warm, last_only=True), warm.state())
    times = []
    for _ in range(repeat):
        cache = model.make_cache(kv)
        t = time.perf_counter()
        for s in range(0, ctx, chunk):
            mx.eval(model.forward(ids[s:s + chunk], cache, last_only=True), cache.state())
        times.append(time.perf_counter() - t)
    return ctx / statistics.median(times)


def kernel_us(model, kv: str, ctx: int, chunk: int, reps: int) -> float:
    """Microseconds of one ``turbo_prefill.attend`` call for the last chunk of ``ctx`` tokens
    (random queries, keys and values quantized as the cache stores them), ``reps`` chained."""
    import mlx.core as mx

    from quantref_mlx import turbo_prefill
    from quantref_mlx.fused_decode import TurboSpec

    a = model.args
    T = min(chunk, ctx)
    cache = model.make_cache(kv)
    ids = np.random.default_rng(1).integers(0, a.vocab_size, ctx).tolist()
    for s in range(0, ctx, chunk):  # the cache's blocks and values, as a prefill leaves them
        mx.eval(model.forward(ids[s:s + chunk], cache, last_only=True), cache.state())
    (kbuf,), (vbuf,) = cache._k[0].arrays, cache._v[0].arrays
    spec = TurboSpec.of(cache)
    hd = a.head_dim
    q = mx.random.normal((a.n_heads, T, hd), key=mx.random.key(0))
    scale = hd ** -0.5

    def chain(n):
        out = q
        for _ in range(n):  # each call's queries depend on the last: no overlap
            o = turbo_prefill.attend(out, kbuf, vbuf, ctx - T, spec, scale)
            out = q + 0.0 * o.reshape(T, a.n_heads, hd).transpose(1, 0, 2)
        return out

    mx.eval(chain(2))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        mx.eval(chain(reps))
        best = min(best, time.perf_counter() - t)
    return best / reps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="128,1024,4096,8192")
    ap.add_argument("--kv", default="turbo_kv_4b,turbo_kv_5b")
    ap.add_argument("--variants", default="auto",
                    help="turbo_prefill's block shapes: auto, autoP or NWxROWS, comma-separated")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kernel-reps", type=int, default=20)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()

    import mlx.core as mx

    from quantref.testing import random_model
    from quantref_mlx import turbo_prefill
    from quantref_mlx.fused_decode import TurboSpec
    from quantref_mlx.model import from_oracle

    model = from_oracle(random_model(seed=0), weights="quantized", bits=4, embed_bits=8)
    contexts = [int(c) for c in args.contexts.split(",")]
    kvs = [k for k in args.kv.split(",") if k]
    variants = [v for v in args.variants.split(",") if v]
    knobs = ("NW", "ROWS", "PER_WARP")
    default = {k: getattr(turbo_prefill, k) for k in knobs}

    def shape(v: str) -> dict:
        if v.startswith("auto"):
            return dict(default, PER_WARP=int(v[4:]) if v[4:] else default["PER_WARP"])
        nw, rows = map(int, v.split("x"))
        return dict(default, NW=nw, ROWS=rows)

    print(f"machine: {machine()}")
    print(f"model: random 4-bit weights, SmolLM2-135M shapes; chunk {args.chunk}; "
          f"median of {args.repeat}; auto: turbo_prefill's rule (at least "
          f"{turbo_prefill.QUERIES} queries a block, {turbo_prefill.PER_WARP} a warp, one block "
          f"an SM at most; SMs: {turbo_prefill._sm_count()}), NWxROWS forced")
    if not turbo_prefill.available():
        print("(turbo_prefill's kernel does not run here: the plain graph's prefill)")
    rows = []
    for ctx in contexts:
        fp16 = prefill_tps(model, "fp16", ctx, args.chunk, args.repeat)
        rows.append(dict(ctx=ctx, kv="fp16", variant="-", prefill=fp16, kernel_us=None))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        for kv in kvs:
            for v in variants:
                for k, x in shape(v).items():
                    setattr(turbo_prefill, k, x)
                try:
                    tps = prefill_tps(model, kv, ctx, args.chunk, args.repeat)
                    kus = kernel_us(model, kv, ctx, args.chunk, args.kernel_reps) \
                        if turbo_prefill.available() else None
                    spec = TurboSpec.of(model.make_cache(kv))
                    a = model.args
                    T = min(args.chunk, ctx)
                    rows_, nw_ = turbo_prefill._shape(T, a.n_kv_heads,
                                                      a.n_heads // a.n_kv_heads, a.head_dim, spec)
                    used = f"{nw_}x{rows_}"
                finally:
                    for k, x in default.items():
                        setattr(turbo_prefill, k, x)
                rows.append(dict(ctx=ctx, kv=kv, variant=f"{v} ({used})", prefill=tps,
                                 kernel_us=kus, vs_fp16=tps / fp16))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    mx.synchronize()
    print("\n| context | KV | block (warps x rows) | prefill tok/s | vs fp16 (same run) | "
          "attend kernel us (last chunk) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        k = f"{r['kernel_us']:.0f}" if r["kernel_us"] else "-"
        v = f"{r['vs_fp16']:.2f}" if "vs_fp16" in r else "-"
        print(f"| {r['ctx']} | {r['kv']} | {r['variant']} | {r['prefill']:.0f} | {v} | {k} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(machine=machine(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
