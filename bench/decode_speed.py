"""Decode and prefill speed: NumPy, MLX (lazy: one evaluation per step), MLX (an evaluation
after every operation), per KV cache type and context length; one table, ratios against lazy
MLX measured in the same run.

    python bench/decode_speed.py                       # the default model's shapes, random weights
    python bench/decode_speed.py --model PATH          # a real GGUF
    python bench/decode_speed.py --contexts 128,1024 --kv fp32,turbo_kv_4b --modes mlx,mlx-op
    python bench/decode_speed.py --weights quantized --llama-bench B --llama-gguf G --mlx-lm

``--llama-bench PATH --llama-gguf PATH`` runs llama.cpp's ``llama-bench`` on that GGUF (f16,
q8_0 and q4_0 KV caches, flash attention, full offload) before and after quantref's rows, in
the same process, and reports both runs' figures beside ours; ``--mlx-lm`` adds mlx-lm's Llama
(``mlx_lm.models.llama``) with random weights of the same shapes and the same quantization, the
MLX peer, decoding the way ``mlx_lm.generate`` does. One table, one machine, one run.

At each context C a fresh cache is prefilled with C random tokens (prefill tokens/s: chunks of
``--chunk`` tokens, one evaluation per chunk), then ``--steps`` tokens are decoded greedily, one
at a time, each step reading its token back to the host as generation does (decode tokens/s,
after one untimed warm-up step). Random weights serve as well as real ones for speed: the same
shapes, the same kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from _common import machine  # bench/ is the script's folder, so on sys.path

MODES = ("numpy", "mlx", "mlx-plain", "mlx-plain-c", "mlx-fused-eager", "mlx-persistent",
         "mlx-persistent-flags", "mlx-persistent-rows", "mlx-persistent-rows8", "mlx-op",
         "mlx-prefill-plain")
# mlx: lazy, one evaluation per token, as generation runs it (quantref_mlx.generate.Decoder's
#   defaults: on CUDA with an fp32/fp16 cache the fused-kernel step, compiled; turbo_kv caches
#   on a GPU the plain graph, compiled; otherwise the plain graph);
# mlx-plain: lazy, the plain graph built op by op in Python each step, not compiled;
# mlx-plain-c: lazy, the plain graph compiled (mx.compile);
# mlx-fused-eager: lazy, the fused-kernel step (quantref_mlx.fused_decode), not compiled;
# mlx-persistent: lazy, the whole token in one launch (quantref_mlx.persistent_decode), its
#   phases ending at grid barriers; mlx-persistent-flags: the same, phases ending on flags;
#   mlx-persistent-rows: every projection one row per warp over the grid (persistent.cu);
#   mlx-persistent-rows8: the rows form, 8 greedy tokens a launch (Decoder(steps=8)), the
#   kernel feeding its own argmax back in;
# mlx-op: an evaluation after every operation (the per-op-sync pattern, --sync-every-op);
# mlx-prefill-plain: as mlx, but a turbo_kv cache's prefill attention runs the plain graph
#   instead of its CUDA kernel (quantref_mlx.turbo_prefill, which mlx uses on CUDA): the
#   prefill column's comparison (turbo_kv caches only).
DECODER = {"mlx": {}, "mlx-prefill-plain": {}, "mlx-plain": dict(compiled=False, fused=False),
           "mlx-plain-c": dict(compiled=True, fused=False),
           "mlx-fused-eager": dict(compiled=False, fused=True),
           "mlx-persistent": dict(persistent="grid"),
           "mlx-persistent-flags": dict(persistent="flags"),
           "mlx-persistent-rows": dict(persistent="rows"),
           "mlx-persistent-rows8": dict(persistent="rows", steps=8), "mlx-op": dict(fused=False)}
DEFAULT_MODES = ("numpy", "mlx", "mlx-plain", "mlx-op")


def applies(mode: str, kv: str) -> bool:
    """Whether ``mode`` can decode with a ``kv`` cache (the fused step: fp32 / fp16 only;
    the plain prefill's comparison: turbo_kv only)."""
    if mode == "mlx-prefill-plain":
        return kv.startswith("turbo_kv")
    return mode != "mlx-fused-eager" or kv in ("fp32", "fp16")


def build(args):
    """(numpy model or None, {mode: model}) for the requested modes."""
    import quantref

    if args.model:
        np_model = quantref.load(args.model)
        source = Path(args.model).name
    else:
        from quantref.testing import random_model

        np_model = random_model(seed=0)
        source = "random weights, SmolLM2-135M shapes"
    models = {}
    if "numpy" in args.modes:
        models["numpy"] = np_model
    mlx_modes = [m for m in args.modes if m.startswith("mlx")]
    if mlx_modes:
        import quantref_mlx
        from quantref_mlx.model import from_oracle

        for mode in mlx_modes:
            sync = "op" if mode == "mlx-op" else "step"
            shared = next((models[m] for m in models if m.startswith("mlx") and m != "mlx-op"),
                          None)
            if mode != "mlx-op" and shared is not None:
                models[mode] = shared  # the same model, decoded another way
                continue
            if args.model:
                models[mode] = quantref_mlx.load(args.model, weights=args.weights, sync=sync)
            else:
                models[mode] = from_oracle(np_model, weights=args.weights, bits=args.bits,
                                           embed_bits=args.embed_bits, sync=sync)
    return models, source


def run_numpy(model, kv, ctx, steps, chunk):
    rng = np.random.default_rng(ctx)
    ids = rng.integers(0, model.args.vocab_size, ctx).tolist()
    cache = model.make_cache(kv)
    t = time.perf_counter()
    for s in range(0, ctx, chunk):
        logits = model.forward(ids[s:s + chunk], cache, last_only=True)
    prefill = ctx / (time.perf_counter() - t)
    token = int(np.argmax(logits[-1]))
    logits = model.forward([token], cache, last_only=True)  # warm-up step
    t = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(logits[-1]))
        logits = model.forward([token], cache, last_only=True)
    return prefill, steps / (time.perf_counter() - t)


def timed_decode(step, y, steps: int) -> float:
    """Decode tokens/s of ``step(token) -> next token`` (lazy), as generation runs it: two
    untimed warm-up steps (the first compiled call traces), then step n+1 built and started
    before token n is read back. A persistent step that decodes K tokens a launch: K warm-up
    steps, then the timed steps start from a token of the host's (a new launch) and are a
    multiple of K, so that the time holds whole launches, each launch's GPU time in it."""
    import mlx.core as mx

    k = getattr(getattr(step, "persistent", None), "steps", 1)
    steps = -(-steps // k) * k
    for _ in range(max(2, k)):
        y = step(y)
        y.item()
    if k > 1:
        mx.synchronize()
        y = mx.array(np.array(y))  # not the token handed out: a new launch from it
    t = time.perf_counter()
    for _ in range(steps):
        nxt = step(y)
        mx.async_eval(nxt)
        y.item()
        y = nxt
    y.item()
    return steps / (time.perf_counter() - t)


def run_mlx(model, kv, ctx, steps, chunk, decoder_options, plain_prefill=False):
    """Prefill and decode tokens/s; ``plain_prefill``: a turbo_kv cache's prefill attention
    through the plain graph, not its CUDA kernel (``quantref_mlx.turbo_prefill.USE``)."""
    from quantref_mlx import turbo_prefill

    turbo_prefill.USE = False if plain_prefill else None
    try:
        return _run_mlx(model, kv, ctx, steps, chunk, decoder_options)
    finally:
        turbo_prefill.USE = None


def _run_mlx(model, kv, ctx, steps, chunk, decoder_options):
    import mlx.core as mx

    from quantref.generate import SamplerArgs
    from quantref_mlx.cache import STEP
    from quantref_mlx.generate import Decoder, make_sampler

    sampler = make_sampler(SamplerArgs())
    rng = np.random.default_rng(ctx)
    ids = rng.integers(0, model.args.vocab_size, ctx).tolist()
    warm = model.make_cache(kv)  # untimed: the first run of a kernel compiles it (JIT)
    mx.eval(model.forward(ids[:min(ctx, chunk)], warm, last_only=True), warm.state())
    cache = model.make_cache(kv)
    t = time.perf_counter()
    for s in range(0, ctx, chunk):
        logits = model.forward(ids[s:s + chunk], cache, last_only=True)
        mx.eval(logits, cache.state())
    prefill = ctx / (time.perf_counter() - t)
    # The capacity the whole run needs, reserved as a compiled decoder would reserve it: the
    # buffers must not grow (nor a compiled step retrace, ~tens of ms) inside the timed loop.
    need = ctx + steps + 24  # the warm-up, and a persistent launch's 8 tokens ahead, each way
    cache.reserve(max(STEP, 1 << (need - 1).bit_length()))
    decoder = Decoder(model, cache, sampler, **decoder_options)
    return prefill, timed_decode(decoder, sampler(logits), steps)


def warm_up(models, kvs, chunk) -> None:
    """Run every MLX decode path once, untimed, at a context long enough for the fused step's
    split attention: a kernel's first use compiles it (NVRTC, ~1 s), which must not land in a
    timed row."""
    import mlx.core as mx

    for mode, model in models.items():
        if mode == "numpy" or mode == "mlx-op":
            continue
        for kv in kvs:
            if applies(mode, kv):
                try:
                    run_mlx(model, kv, 300, 2, chunk, DECODER[mode],
                            mode == "mlx-prefill-plain")
                except Exception:  # noqa: BLE001 - the timed row reports the error
                    pass
    mx.synchronize()


def llama_bench(binary: str, gguf: str, contexts: list[int], steps: int,
                prompt: int, kvs: tuple[str, ...] = ("f16", "q8_0", "q4_0")) -> list[dict]:
    """llama.cpp's own figures: ``llama-bench`` decoding ``steps`` tokens after a context of
    each of ``contexts`` tokens (its ``tg@dN``) and prefilling ``prompt`` tokens, with each KV
    cache type of ``kvs`` (flash attention: llama.cpp needs it for a quantized V cache).
    Rows as ours: ctx, kv, mode "llama.cpp", prefill, decode (tokens/s, the mean of 3 runs)."""
    import subprocess

    rows = []
    for kv in kvs:
        cmd = [binary, "-m", gguf, "-ngl", "99", "-fa", "1", "-ctk", kv, "-ctv", kv,
               "-p", str(prompt), "-n", str(steps), "-d", ",".join(map(str, contexts)),
               "-r", "3", "-o", "json"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
            records = json.loads(out.stdout)
        except (subprocess.SubprocessError, OSError, ValueError) as e:
            rows.append(dict(ctx=0, kv=kv, mode="llama.cpp", error=f"{type(e).__name__}: {e}"))
            continue
        for ctx in contexts:
            gen = [r for r in records if r.get("n_gen") and r.get("n_depth") == ctx]
            pp = [r for r in records if r.get("n_prompt") and r.get("n_depth") == ctx]
            if gen:
                rows.append(dict(ctx=ctx, kv=kv, mode="llama.cpp",
                                 prefill=pp[0]["avg_ts"] if pp else float("nan"),
                                 decode=gen[0]["avg_ts"],
                                 build=gen[0].get("build_commit", "?"),
                                 gpu=gen[0].get("gpu_info", "?")))
    return rows


def mlx_lm_model(np_model, bits: int, group_size: int = 32):
    """mlx-lm's Llama with ``np_model``'s shapes and random weights, quantized as ours (its
    ``nn.quantize``: ``bits`` bits, groups of ``group_size``; the embedding too)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama

    a = np_model.args
    args = llama.ModelArgs(model_type="llama", hidden_size=a.dim, num_hidden_layers=a.n_layers,
                           intermediate_size=a.hidden_dim, num_attention_heads=a.n_heads,
                           num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim,
                           rms_norm_eps=a.norm_eps, vocab_size=a.vocab_size,
                           rope_theta=a.rope_base, tie_word_embeddings=True)
    model = llama.Model(args)
    if bits:
        nn.quantize(model, group_size=group_size, bits=bits)
    mx.eval(model.parameters())
    return model


def run_mlx_lm(model, ctx: int, steps: int, chunk: int) -> tuple[float, float]:
    """Prefill and decode tokens/s of an mlx-lm model, as ``mlx_lm.generate`` runs it: a
    ``KVCache`` per layer, prefill in chunks, then one token at a time with the next step
    started (``mx.async_eval``) before this one's token is read back."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    rng = np.random.default_rng(ctx)
    ids = mx.array(rng.integers(0, model.args.vocab_size, ctx).astype(np.int32))
    cache = make_prompt_cache(model)
    mx.eval(model(ids[None, :min(ctx, chunk)], cache=make_prompt_cache(model)))  # warm-up
    t = time.perf_counter()
    for s in range(0, ctx, chunk):
        logits = model(ids[None, s:s + chunk], cache=cache)
        mx.eval(logits, [c.state for c in cache])
    prefill = ctx / (time.perf_counter() - t)

    def step(y):
        return mx.argmax(model(y[None], cache=cache)[:, -1, :], axis=-1)

    return prefill, timed_decode(step, mx.argmax(logits[:, -1, :], axis=-1), steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF path (default: random weights of SmolLM2-135M's shapes)")
    ap.add_argument("--contexts", default="128,1024,4096")
    ap.add_argument("--kv", default="fp32,fp16,turbo_kv_4b,turbo_kv_5b")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"of {MODES}")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed (MLX lazy)")
    ap.add_argument("--slow-steps", type=int, default=8, help="decode steps for numpy / mlx-op")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk")
    ap.add_argument("--weights", default="auto", help="MLX weight layout: auto|quantized|float")
    ap.add_argument("--bits", type=int, default=4, help="quantized random weights: 4 or 8")
    ap.add_argument("--embed-bits", type=int, default=8,
                    help="... and their embedding (default 8: SmolLM2's file is Q4_1, Q8_0)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench binary: its rows too, run "
                    "before and after ours")
    ap.add_argument("--llama-gguf", help="the GGUF llama-bench runs (SmolLM2-135M's shapes)")
    ap.add_argument("--mlx-lm", action="store_true", help="add mlx-lm's Llama, same shapes")
    args = ap.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.modes:
        if m not in MODES:
            sys.exit(f"unknown mode {m!r}; of {MODES}")
    contexts = [int(c) for c in args.contexts.split(",")]
    kvs = [k for k in args.kv.split(",") if k]

    if bool(args.llama_bench) != bool(args.llama_gguf):
        sys.exit("--llama-bench and --llama-gguf go together")
    models, source = build(args)
    warm_up(models, kvs, args.chunk)
    rows = []
    if args.llama_bench:  # before ours ...
        for r in llama_bench(args.llama_bench, args.llama_gguf, contexts, args.steps, args.chunk):
            rows.append(dict(r, mode="llama.cpp (before)"))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    peer = None
    if args.mlx_lm:
        from quantref.testing import random_model

        peer = mlx_lm_model(random_model(seed=0), 0 if args.weights == "float" else args.bits)
    for ctx in contexts:
        if peer is not None:
            try:
                prefill, decode = run_mlx_lm(peer, ctx, args.steps, args.chunk)
                rows.append(dict(ctx=ctx, kv="fp16", mode="mlx-lm", prefill=prefill,
                                 decode=decode))
            except Exception as e:  # noqa: BLE001 - one failure must not lose the table
                rows.append(dict(ctx=ctx, kv="fp16", mode="mlx-lm",
                                 error=f"{type(e).__name__}: {e}"))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        for kv in kvs:
            for mode in args.modes:
                if not applies(mode, kv):
                    continue
                steps = args.slow_steps if mode in ("numpy", "mlx-op") else args.steps
                try:
                    if mode == "numpy":
                        prefill, decode = run_numpy(models[mode], kv, ctx, steps, args.chunk)
                    else:
                        prefill, decode = run_mlx(models[mode], kv, ctx, steps, args.chunk,
                                                  DECODER[mode], mode == "mlx-prefill-plain")
                    rows.append(dict(ctx=ctx, kv=kv, mode=mode, prefill=prefill, decode=decode))
                except Exception as e:  # noqa: BLE001 - one failure must not lose the table
                    rows.append(dict(ctx=ctx, kv=kv, mode=mode, error=f"{type(e).__name__}: {e}"))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    if args.llama_bench:  # ... and after
        for r in llama_bench(args.llama_bench, args.llama_gguf, contexts, args.steps, args.chunk):
            rows.append(dict(r, mode="llama.cpp (after)"))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    print(f"machine: {machine()}")
    llama = next((r for r in rows if r["mode"].startswith("llama.cpp") and "build" in r), None)
    if llama:
        print(f"llama.cpp: llama-bench build {llama['build']} on {llama['gpu']}, flash attention, "
              f"-ngl 99, {args.llama_gguf}")
    layout = next((m.layout for k, m in models.items() if k.startswith("mlx")), "-")
    if layout == "quantized" and not args.model:
        layout += f" ({args.bits}-bit, embedding {args.embed_bits}-bit)"
    print(f"model:   {source}; MLX weights {layout}; decode steps {args.steps} (lazy MLX), "
          f"{args.slow_steps} (numpy, per-op MLX); prefill chunk {args.chunk}")
    print("| context | KV | mode | prefill tok/s | decode tok/s | decode vs lazy MLX, same KV "
          "| decode vs lazy MLX fp16 | decode vs llama.cpp q4_0 KV | prefill vs lazy MLX fp16 |")
    print("|---|---|---|---|---|---|---|---|---|")

    def find(ctx, kv, mode):
        return next((x for x in rows if x["ctx"] == ctx and x["kv"] == kv
                     and x["mode"] == mode and "error" not in x), None)

    def ratio(r, ref, what="decode"):
        return f"{r[what] / ref[what]:.2f}x" if ref else "-"

    for r in rows:
        if "error" in r:
            print(f"| {r['ctx']} | {r['kv']} | {r['mode']} | {r['error']} | | | | | |")
            continue
        q4 = [x for x in rows if x["ctx"] == r["ctx"] and x["kv"] == "q4_0" and "error" not in x
              and x["mode"].startswith("llama.cpp")]
        best_q4 = max(q4, key=lambda x: x["decode"]) if q4 else None  # the faster of its runs
        print(f"| {r['ctx']} | {r['kv']} | {r['mode']} | {r['prefill']:.0f} | "
              f"{r['decode']:.1f} | {ratio(r, find(r['ctx'], r['kv'], 'mlx'))} | "
              f"{ratio(r, find(r['ctx'], 'fp16', 'mlx'))} | {ratio(r, best_q4)} | "
              f"{ratio(r, find(r['ctx'], 'fp16', 'mlx'), 'prefill')} |")
    # Issue 9's plain-graph comparison: what Metal (and a GPU without the fused step) runs, as
    # Decoder runs each cache there: turbo_kv compiled, fp16 op by op. Rows timed seconds apart
    # on a host-bound step: bench/plain_graph.py interleaves them and pairs the ratios.
    plain = [(ctx, kv) for ctx in contexts for kv in kvs if kv.startswith("turbo")
             and find(ctx, kv, "mlx-plain-c") and find(ctx, "fp16", "mlx-plain")]
    for ctx, kv in plain:
        t, f = find(ctx, kv, "mlx-plain-c"), find(ctx, "fp16", "mlx-plain")
        print(f"plain graph, context {ctx}: {kv} compiled / fp16 op by op (as Decoder runs each "
              f"without the fused step): decode {t['decode'] / f['decode']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
