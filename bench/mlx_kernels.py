"""What bounds an MLX decode step on this device: how many kernels one token costs, and what one
kernel costs.

    python bench/mlx_kernels.py [--kv fp32,turbo_kv_4b]

1. Operations per decoded token: the primitives of one decode step's graph (SmolLM2-135M shapes,
   random 4-bit weights), by type. View-like primitives (reshape, broadcast, ...) launch no
   kernel on their own; the rest are kernel launches unless ``mx.compile`` fuses them.
2. The cost of one kernel: chains of N dependent operations evaluated once (lazy) and with an
   evaluation after each (per-op sync): an element-wise op on a 576-vector, a 4-bit quantized
   matrix-vector product of the model's shapes (float32 and float16 activations), a float32
   matrix-vector product, and a decode attention kernel.
Per-token time is then about (kernels per token) x (cost of one).
"""

from __future__ import annotations

import argparse
import io
import re
import time
from collections import Counter

import mlx.core as mx
import numpy as np

VIEWS = {"Reshape", "ExpandDims", "Squeeze", "Broadcast", "Slice", "Transpose", "AsStrided",
         "StopGradient", "Split"}


def step_graph_ops(kv: str) -> Counter:
    from quantref.generate import SamplerArgs
    from quantref.testing import random_model
    from quantref_mlx.generate import decode_step, make_sampler
    from quantref_mlx.model import from_oracle

    m = from_oracle(random_model(seed=0), weights="quantized")
    sampler = make_sampler(SamplerArgs())
    cache = m.make_cache(kv)
    logits = m.forward(list(range(128)), cache, last_only=True)
    mx.eval(logits, cache.state())
    y = sampler(logits)
    mx.eval(y)
    nxt = decode_step(m, y, cache, sampler)
    buf = io.StringIO()
    mx.export_to_dot(buf, nxt, *cache.state())
    return Counter(re.findall(r'label ="([A-Za-z]+)', buf.getvalue()))


def chain_cost(op, x, n: int, sync: bool) -> float:
    """Seconds per operation of a chain of ``n`` dependent ``op`` applications."""
    y = op(x)
    mx.eval(y)
    t = time.perf_counter()
    y = x
    for _ in range(n):
        y = op(y)
        if sync:
            mx.eval(y)
    mx.eval(y)
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kv", default="fp32,turbo_kv_4b")
    ap.add_argument("--n", type=int, default=2000, help="chain length")
    args = ap.parse_args()
    print(f"MLX {mx.__version__} on {mx.default_device()}")

    print("\n1. operations in one decode step (SmolLM2-135M shapes, 30 layers, 4-bit weights)")
    for kv in args.kv.split(","):
        ops = step_graph_ops(kv)
        compute = {k: v for k, v in ops.items() if k not in VIEWS}
        print(f"   {kv:12s} {sum(ops.values()):5d} primitives, {sum(compute.values()):5d} "
              f"that launch a kernel (unfused): "
              + ", ".join(f"{k} {v}" for k, v in sorted(compute.items(), key=lambda kv_: -kv_[1])))

    rng = np.random.default_rng(0)
    vec = mx.array(rng.standard_normal((1, 576)).astype(np.float32))
    w = mx.array((rng.standard_normal((576, 576)) / 24).astype(np.float32))
    wq, sq, bq = mx.quantize(w, group_size=32, bits=4)
    sq, bq = sq.astype(mx.float16), bq.astype(mx.float16)
    q = mx.array(rng.standard_normal((1, 9, 1, 64)).astype(np.float32))
    k = mx.array(rng.standard_normal((1, 3, 128, 64)).astype(np.float32))
    mx.eval(vec, w, wq, sq, bq, q, k)
    cases = [
        ("element-wise op, 576 floats", lambda x: -x, vec),
        ("4-bit qmv 576x576, float32 x", lambda x: mx.quantized_matmul(
            x, wq, sq, bq, transpose=True, group_size=32, bits=4), vec),
        ("4-bit qmv 576x576, float16 x", lambda x: mx.quantized_matmul(
            x, wq, sq, bq, transpose=True, group_size=32, bits=4), vec.astype(mx.float16)),
        ("float32 matvec 576x576", lambda x: x @ w.T, vec),
        ("attention, 9/3 heads, 128 keys", lambda x: mx.fast.scaled_dot_product_attention(
            x, k, k, scale=0.125), q),
    ]
    print(f"\n2. cost of one operation, chains of {args.n} (microseconds)")
    print(f"   {'operation':34s} {'lazy':>8s} {'eval each':>10s}")
    for name, op, x in cases:
        lazy = chain_cost(op, x, args.n, sync=False) * 1e6
        each = chain_cost(op, x, max(args.n // 4, 50), sync=True) * 1e6
        print(f"   {name:34s} {lazy:8.2f} {each:10.2f}")


if __name__ == "__main__":
    main()
