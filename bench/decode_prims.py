"""MLX primitives per decode step and per attention layer of the plain graph, per KV cache type:
what a GPU launches (about one kernel per non-view primitive), counted on any machine.

    python bench/decode_prims.py [--kv fp16,turbo_kv_4b,turbo_kv_5b,turbo_kv_3b] [--ctx 16]
                                 [--cpu-quantizer] [--by-type]

On a GPU an MLX decode step costs about one kernel launch per primitive, ~4-10 us of host time
each and a dependent chain (``bench/decode_phases.py``, ``bench/mlx_kernels.py``), so the number
of primitives bounds a step, not its flops. This script builds graphs without evaluating them
and counts the primitives in them (``mx.export_to_dot``), for SmolLM2-135M's shapes with random
4-bit weights after ``--ctx`` prefilled tokens:

- ``plain``: the lazy graph built op by op each step (:func:`quantref_mlx.generate.decode_step`
  on a :class:`quantref_mlx.cache.KVCache`: ``mlx-plain`` in ``bench/decode_speed.py``);
- ``compiled``: the step compiled with ``mx.compile`` over a
  :class:`quantref_mlx.cache.StepCache` at a fixed capacity (``mlx-plain-c``; compiled turbo_kv
  steps run on GPUs only, but the graph is counted here all the same).

Columns: ``layer``, the primitives of one layer's attention (layer 0: QKV projections, RoPE,
the cache's append, scores, softmax, values, output projection; its input evaluated
beforehand); ``step``, the whole decoded token (30 layers, embedding, output, greedy sampler).
``kernels`` leaves out the view primitives, which launch nothing (reshape, slice, broadcast, ...).

Quantizer: on a GPU a turbo_kv key is quantized by one custom kernel
(``turbo_kv._quantize_kernel``), on the CPU by ~100 MLX operations. By default the GPU's is
counted (the kernel is replaced by a stand-in of one primitive, counted as one kernel, since
custom kernels cannot be built on a machine without the backend); ``--cpu-quantizer`` counts the
CPU's operations instead. Caveat: on the CPU, ``mx.fast.scaled_dot_product_attention`` (the fp16
cache's attention) is its fallback of ~5 primitives; a GPU runs it as one kernel.
"""

from __future__ import annotations

import argparse
import io
import re
from collections import Counter
from contextlib import contextmanager

import mlx.core as mx

from _common import machine

VIEWS = {"Reshape", "ExpandDims", "Squeeze", "Broadcast", "Slice", "Transpose", "AsStrided",
         "StopGradient", "Split", "View", "Unflatten", "Flatten"}
STAND_IN = "BitwiseInvert"  # the GPU quantizer's stand-in (no other graph here uses it)


def count(*outputs: mx.array) -> Counter:
    """Primitives by name in the graph of ``outputs`` (evaluated arrays are leaves)."""
    buf = io.StringIO()
    mx.export_to_dot(buf, *outputs)
    return Counter(re.findall(r'label ="([A-Za-z0-9_]+)"', buf.getvalue()))


def kernels(ops: Counter) -> int:
    return sum(n for name, n in ops.items() if name not in VIEWS)


@contextmanager
def gpu_quantizer():
    """turbo_kv's key quantizer as a GPU runs it: one primitive standing in for the kernel."""
    from quantref_mlx import turbo_kv as tkv

    def stand_in(x, kind, backend):
        lead, d = x.shape[:-1], x.shape[-1]
        nc, bb = -(-d // tkv.BLOCK), tkv.block_bytes(kind)
        flat = mx.broadcast_to(mx.view(x.reshape(-1), mx.uint8)[:1], (*lead, nc, bb))
        return mx.bitwise_invert(flat)

    saved = tkv._backend, tkv._quantize_kernel
    tkv._backend, tkv._quantize_kernel = (lambda: "cuda"), stand_in
    try:
        yield
    finally:
        tkv._backend, tkv._quantize_kernel = saved


def prefilled(model, kv: str, ctx: int):
    cache = model.make_cache(kv)
    logits = model.forward(list(range(1, ctx + 1)), cache, last_only=True)
    mx.eval(logits, cache.state())
    return cache, mx.argmax(logits, axis=-1).astype(mx.int32)


def plain_counts(model, kv: str, ctx: int) -> tuple[Counter, Counter]:
    """(one layer's attention, one step), the plain graph on a KVCache."""
    from quantref_mlx.generate import decode_step

    cache, token = prefilled(model, kv, ctx)
    h = mx.random.normal((1, model.args.dim))
    mx.eval(h, token)
    layer = count(model.attention(0, h, cache), *cache.state())
    cache, token = prefilled(model, kv, ctx)
    step = count(decode_step(model, token, cache, lambda z: mx.argmax(z, axis=-1)),
                 *cache.state())
    return layer, step


def compiled_counts(model, kv: str, ctx: int) -> tuple[Counter, Counter]:
    """(one layer's attention, one step), compiled over a StepCache (as Decoder compiles it)."""
    from quantref_mlx.cache import STEP, StepCache

    cache, token = prefilled(model, kv, ctx)
    cache.reserve(max(STEP, 1 << ctx.bit_length()))
    k, v = cache.take_buffers()
    offset = mx.array(ctx, mx.int32)
    h = mx.random.normal((1, model.args.dim))
    mx.eval(h, offset)

    def layer_fn(h, offset, k0, v0):
        view = StepCache(cache.k_codec, cache.v_codec, [k0], [v0], offset)
        return model.attention(0, h, view), view.k[0], view.v[0]

    def step_fn(token, offset, k, v):
        view = StepCache(cache.k_codec, cache.v_codec, k, v, offset)
        logits = model.forward(token, view, last_only=True)
        return mx.argmax(logits, axis=-1), view.k, view.v

    out = mx.compile(layer_fn)(h, offset, k[0], v[0])
    layer = count(out[0], *out[1], *out[2])
    nxt, k2, v2 = mx.compile(step_fn)(token, offset, k, v)
    step = count(nxt, *(a for parts in k2 + v2 for a in parts))
    return layer, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kv", default="fp16,turbo_kv_4b,turbo_kv_5b,turbo_kv_3b")
    ap.add_argument("--ctx", type=int, default=16,
                    help="prefilled tokens (the counts do not depend on it)")
    ap.add_argument("--modes", default="plain,compiled")
    ap.add_argument("--cpu-quantizer", action="store_true",
                    help="count turbo_kv's CPU quantizer (MLX ops), not the GPU's one kernel")
    ap.add_argument("--by-type", action="store_true", help="list one layer's kernels by type")
    args = ap.parse_args()

    from quantref.testing import random_model
    from quantref_mlx.model import from_oracle

    model = from_oracle(random_model(seed=0), weights="quantized", bits=4, embed_bits=8)
    print(f"machine: {machine()}")
    print(f"SmolLM2-135M shapes, 4-bit weights, context {args.ctx}, "
          f"{'CPU' if args.cpu_quantizer else 'GPU'} key quantizer")
    print("| KV | graph | layer: primitives | layer: kernels | step: primitives | step: kernels |")
    print("|---|---|---|---|---|---|")
    by_type = []
    for kv in args.kv.split(","):
        for mode in args.modes.split(","):
            fn = plain_counts if mode == "plain" else compiled_counts
            if args.cpu_quantizer:
                layer, step = fn(model, kv, args.ctx)
            else:
                with gpu_quantizer():
                    layer, step = fn(model, kv, args.ctx)
            print(f"| {kv} | {mode} | {sum(layer.values())} | {kernels(layer)} | "
                  f"{sum(step.values())} | {kernels(step)} |", flush=True)
            compute = {k: n for k, n in layer.items() if k not in VIEWS}
            by_type.append(f"{kv} {mode}: " + ", ".join(
                f"{'quantize kernel' if k == STAND_IN else k} {n}"
                for k, n in sorted(compute.items(), key=lambda kn: -kn[1])))
    if args.by_type:
        print("\nOne layer's kernels by type:")
        for line in by_type:
            print("  " + line)


if __name__ == "__main__":
    main()
