"""What reading each token back costs a decode step on CUDA: the persistent step's tokens/s
when the host reads the token as the 8-byte copy the Decoder hands out, as a view of the
kernel's own output buffer (what it handed out before), and once every 16 tokens only (the
most the reads could cost), measured in one run on one machine.

    python bench/host_read.py --contexts 128,4096 --kv fp16,turbo_kv_4b

Why: MLX on CUDA keeps a kernel's outputs in device memory; the host reading one moves its whole
buffer into managed memory (a new allocation and a copy), and a later output reusing that
buffer has the GPU fault its page back, before the kernel's first timer mark. Arrays of 8 bytes
or less live in a pool of managed memory that both sides map. Every mode builds and evaluates
the copy (one small kernel a token); they differ only in what the host reads.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import machine  # bench/ is the script's folder, so on sys.path

READS = ("copy", "view", "every16")


def timed(decoder, y, steps: int, read: str) -> float:
    """Tokens/s of ``steps`` tokens, step n+1 started before token n is read back (as
    generation runs it); ``read``: what the host reads (READS)."""
    import mlx.core as mx

    for _ in range(3):  # warm-up: the first calls compile and probe
        y = decoder(y)
        y.item()
    view = decoder._next[1][4:5]
    t = time.perf_counter()
    for i in range(steps):
        nxt = decoder(y)
        now = decoder._next[1][4:5]
        mx.async_eval(nxt, now)
        if read == "copy":
            y.item()
        elif read == "view":
            view.item()
        elif i % 16 == 15:
            y.item()
        y, view = nxt, now
    y.item()
    return steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="128,4096")
    ap.add_argument("--kv", default="fp16,turbo_kv_4b")
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each row (median reported)")
    args = ap.parse_args()

    import mlx.core as mx

    from quantref.generate import SamplerArgs
    from quantref.testing import random_model
    from quantref_mlx.cache import STEP
    from quantref_mlx.generate import Decoder, make_sampler
    from quantref_mlx.model import from_oracle

    # SmolLM2-135M-Instruct's layout, as decode_speed.py and decode_phases.py: 4-bit layers, an
    # 8-bit embedding and output
    model = from_oracle(random_model(seed=0), weights="quantized", bits=4, embed_bits=8)
    sampler = make_sampler(SamplerArgs())
    print(machine())
    print("| ctx | KV | steps a launch | " + " | ".join(f"{r} tok/s" for r in READS)
          + " | copy / view |")
    print("|---|---|---|" + "---|" * (len(READS) + 1))
    for ctx in [int(c) for c in args.contexts.split(",")]:
        for kv in args.kv.split(","):
            for k in (1, 8):
                def fresh():
                    """A cache prefilled with ctx tokens, its decoder and first token."""
                    cache = model.make_cache(kv)
                    logits = model.forward(list(range(1, ctx + 1)), cache, last_only=True)
                    mx.eval(logits, cache.state())
                    cache.reserve(max(STEP, 1 << (ctx + args.steps + 40).bit_length()))
                    decoder = Decoder(model, cache, sampler, persistent="rows", steps=k)
                    return decoder, sampler(logits)

                runs = {r: [] for r in READS}
                for _ in range(args.repeat):  # interleaved: the rows see the same machine
                    for r in READS:
                        runs[r].append(timed(*fresh(), args.steps, r))
                med = {r: float(np.median(v)) for r, v in runs.items()}
                print(f"| {ctx} | {kv} | {k} | "
                      + " | ".join(f"{med[r]:,.0f}" for r in READS)
                      + f" | {med['copy'] / med['view']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
