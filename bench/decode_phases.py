"""Where a lazy MLX decode step's time goes: building the step's graph (Python), MLX encoding it
(``mx.async_eval``: host time), and waiting for the previous token; and what MLX itself costs
per kernel, on a chain of trivial custom kernels (CUDA only).

    python bench/decode_phases.py [--weights quantized] [--steps 100] [--ctx 128]

Random weights of SmolLM2-135M's shapes (``--bits 4 --embed-bits 8``, as SmolLM2's Q4_1 file),
``Decoder`` as generation runs it: step n+1 built and started before token n is read back. The
capacity is reserved first, so that no step retraces inside the timed loop. If building plus
encoding take about as long as a token, the host bounds the step, not the GPU.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from _common import machine


def phases(model, kv: str, ctx: int, steps: int) -> dict:
    """Microseconds per token of each phase of ``steps`` decoded tokens after ``ctx``."""
    from quantref.generate import SamplerArgs
    from quantref_mlx.cache import STEP
    from quantref_mlx.generate import Decoder, make_sampler

    sampler = make_sampler(SamplerArgs())
    cache = model.make_cache(kv)
    logits = model.forward(list(range(1, ctx + 1)), cache, last_only=True)
    mx.eval(logits, cache.state())
    cache.reserve(max(STEP, 1 << (ctx + steps + 4).bit_length()))
    decoder = Decoder(model, cache, sampler)
    y = sampler(logits)
    for _ in range(3):  # warm-up: the first compiled call traces
        y = decoder(y)
        y.item()
    build = encode = wait = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        nxt = decoder(y)
        t1 = time.perf_counter()
        mx.async_eval(nxt)
        t2 = time.perf_counter()
        y.item()
        t3 = time.perf_counter()
        build, encode, wait = build + t1 - t0, encode + t2 - t1, wait + t3 - t2
        y = nxt
    y.item()
    total = time.perf_counter() - start
    us = 1e6 / steps
    return dict(build=build * us, encode=encode * us, wait=wait * us, total=total * us,
                tokens_s=steps / total)


def trivial_chain(n: int, reps: int = 20) -> tuple[float, float]:
    """(end-to-end, host-only) microseconds per kernel of a chain of ``n`` trivial custom
    kernels (a copy of 576 floats, each reading the last one's output)."""
    copy = mx.fast.cuda_kernel(
        name="phases_trivial", input_names=["x"], output_names=["out"],
        source="const int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < N) out[i] = x[i];")
    x = mx.random.normal((576,))
    mx.eval(x)

    def chain() -> mx.array:
        z = x
        for _ in range(n):
            (z,) = copy(inputs=[z], template=[("N", 576)], output_shapes=[(576,)],
                        output_dtypes=[mx.float32], grid=(576, 1, 1), threadgroup=(256, 1, 1))
        return z

    mx.eval(chain())
    mx.synchronize()
    host = 0.0
    start = time.perf_counter()
    for _ in range(reps):
        z = chain()
        t = time.perf_counter()
        mx.async_eval(z)
        host += time.perf_counter() - t
    mx.eval(z)
    mx.synchronize()
    total = time.perf_counter() - start
    return total / reps / n * 1e6, host / reps / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="quantized", help="quantized|float")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--kv", default="fp16,fp32")
    args = ap.parse_args()

    from quantref.testing import random_model
    from quantref_mlx.model import from_oracle

    model = from_oracle(random_model(seed=0), weights=args.weights, bits=4, embed_bits=8)
    print(f"machine: {machine()}")
    print(f"weights {args.weights}, context {args.ctx}, {args.steps} steps")
    print("| KV | build us | async_eval us | wait us | total us | tokens/s |")
    print("|---|---|---|---|---|---|")
    for kv in args.kv.split(","):
        p = phases(model, kv, args.ctx, args.steps)
        print(f"| {kv} | {p['build']:.1f} | {p['encode']:.1f} | {p['wait']:.1f} | "
              f"{p['total']:.1f} | {p['tokens_s']:.1f} |", flush=True)
    if getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        print("\n| chain of trivial custom kernels | us per kernel | of which host |")
        print("|---|---|---|")
        for n in (50, 150, 300):
            total, host = trivial_chain(n)
            print(f"| {n} | {total:.2f} | {host:.2f} |")


if __name__ == "__main__":
    main()
