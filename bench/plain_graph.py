"""The plain graph's decode speed with turbo_kv caches against fp16, interleaved in one process:
issue 9's plain-graph target (turbo_kv at least 0.7x the plain fp16 graph, same card, same run).

    python bench/plain_graph.py [--contexts 128,1024] [--kv turbo_kv_4b,turbo_kv_5b]
                                [--rounds 7] [--steps 24]

The plain graph is what Apple GPUs run (and any device without the fused CUDA step), decoded as
:class:`quantref_mlx.generate.Decoder` runs each cache there: fp16 built op by op each step
(``compiled=False``), turbo_kv compiled (``mx.compile`` over a fixed capacity). SmolLM2-135M's
shapes, random 4-bit weights (8-bit embedding), as ``bench/decode_speed.py``.

A host-bound step's speed drifts from second to second on a shared machine (its figures moved
by 20% between two runs of one command on one lease), so a comparison made of two separate runs
says little. Here every cache is prefilled once and kept; then ``--rounds`` rounds each time
``--steps`` tokens of every cache in turn (the order rotated each round), and the table gives
each cache's median, min and max tokens/s, and the ratio against fp16 per round (paired, so a
slow second slows both sides of a ratio) as min / median / max.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from _common import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="128,1024")
    ap.add_argument("--kv", default="turbo_kv_4b,turbo_kv_5b",
                    help="turbo_kv caches, each against fp16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=24, help="decode steps a round, each cache")
    args = ap.parse_args()

    import mlx.core as mx

    from quantref.generate import SamplerArgs
    from quantref.testing import random_model
    from quantref_mlx.cache import STEP
    from quantref_mlx.generate import Decoder, make_sampler
    from quantref_mlx.model import from_oracle

    model = from_oracle(random_model(seed=0), weights="quantized", bits=4, embed_bits=8)
    sampler = make_sampler(SamplerArgs())
    kvs = ["fp16"] + [k for k in args.kv.split(",") if k]
    print(f"machine: {machine()}")
    print(f"SmolLM2-135M shapes, random 4-bit weights; {args.rounds} rounds of {args.steps} "
          f"tokens a cache; fp16 op by op, turbo_kv compiled (as Decoder runs each)")
    print("| context | KV | decode tok/s, median | min | max | vs fp16, paired: min | median "
          "| max |")
    print("|---|---|---|---|---|---|---|---|")
    for ctx in (int(c) for c in args.contexts.split(",")):
        ids = np.random.default_rng(ctx).integers(0, model.args.vocab_size, ctx).tolist()
        runs = {}  # kv -> [decoder, last token]
        for kv in kvs:
            cache = model.make_cache(kv)
            for s in range(0, ctx, 512):
                logits = model.forward(ids[s:s + 512], cache, last_only=True)
                mx.eval(logits, cache.state())
            # every step of every round within one capacity: a compiled step never retraces
            need = ctx + (args.rounds + 1) * args.steps + 4
            cache.reserve(max(STEP, 1 << (need - 1).bit_length()))
            turbo = kv.startswith("turbo")
            decoder = Decoder(model, cache, sampler, compiled=turbo, fused=False)
            y = sampler(logits)
            for _ in range(2):  # the first compiled call traces
                y = decoder(y)
                y.item()
            runs[kv] = [decoder, y]
        speed = {kv: [] for kv in kvs}
        for r in range(args.rounds):
            for kv in kvs[r % len(kvs):] + kvs[:r % len(kvs)]:
                decoder, y = runs[kv]
                t = time.perf_counter()
                for _ in range(args.steps):  # as generation runs: step n+1 started, token n read
                    nxt = decoder(y)
                    mx.async_eval(nxt)
                    y.item()
                    y = nxt
                y.item()
                speed[kv].append(args.steps / (time.perf_counter() - t))
                runs[kv][1] = y
        for kv in kvs:
            s = speed[kv]
            if kv != "fp16":
                ratios = [a / b for a, b in zip(s, speed["fp16"])]
                paired = (f"{min(ratios):.2f} | **{statistics.median(ratios):.2f}** | "
                          f"{max(ratios):.2f}")
            else:
                paired = "- | - | -"
            print(f"| {ctx} | {kv} | {statistics.median(s):.1f} | {min(s):.1f} | {max(s):.1f} | "
                  f"{paired} |", flush=True)


if __name__ == "__main__":
    main()
