"""The fused decode step (``quantref_mlx.fused_decode``) against the plain MLX graph and the NumPy
oracle, on a CUDA GPU (the only place its kernels run).

    python bench/fused_decode_check.py [--ctx 100] [--steps 48]

Random weights of SmolLM2-135M's shapes, float and quantized (4 bits, the embedding 8, as
SmolLM2's Q4_1 / Q8_0 file; the oracle then runs on the same weights dequantized). For fp32 and
fp16 caches, one prompt is prefilled into a NumPy cache and MLX caches, then the same forced
tokens are decoded by each path: the oracle, MLX's plain graph, the fused step (through
``Decoder``, eager and compiled). Per path: the largest difference of a step's logits from the
oracle's, relative to the largest |logit|, over all steps, and how often the arg-max agrees.
Also: the operations in one fused step's graph.
"""

from __future__ import annotations

import argparse
import io
import itertools
import re
from collections import Counter

import mlx.core as mx
import numpy as np

from _common import machine
from mlx_kernels import VIEWS  # primitives that launch no kernel


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def per_call(step, x0: mx.array, n: int) -> float:
    """Microseconds per call of ``step(x) -> y`` (``y [dim]`` like ``x``) in a chain of ``n``
    calls, each taking the last one's output, evaluated together (lazy): kernels as a decode
    step runs them, one waiting for the one before."""
    import time

    def chain(k: int) -> mx.array:
        y = x0
        for _ in range(k):
            y = step(y)
        return y

    mx.eval(chain(4))  # compile (JIT) and warm up
    y = chain(n)
    t = time.perf_counter()
    mx.eval(y)
    return (time.perf_counter() - t) / n * 1e6


def dequantized_oracle(np_model, m):
    """A NumPy model whose float32 weights are ``m``'s, dequantized (exactly: see
    ``Linear.rows``)."""
    import dataclasses

    import quantref

    def full(lin) -> np.ndarray:  # [out, in] float32
        return np.array(lin.rows(mx.arange(lin.weight.shape[0])))

    def split(fused) -> list[np.ndarray]:
        return np.split(full(fused.whole), np.cumsum(fused.sizes)[:-1].tolist())

    w = m.weights
    layers = []
    for lw, ref in zip(w.layers, np_model.weights.layers):
        wq, wk, wv = split(lw.wqkv)
        w_gate, w_up = split(lw.w_gate_up)
        layers.append(dataclasses.replace(ref, wq=wq, wk=wk, wv=wv, wo=full(lw.wo),
                                          w_gate=w_gate, w_up=w_up, w_down=full(lw.w_down)))
    embd = full(w.token_embd)
    out = embd if w.output is w.token_embd else full(w.output)
    weights = dataclasses.replace(np_model.weights, token_embd=embd, layers=layers, output=out)
    return quantref.Model(np_model.args, weights)


def kernel_costs(m, n: int, layout: str) -> None:
    """What each kind of operation of a fused step costs, evaluated n at a time."""
    from quantref_mlx import kernels
    from quantref_mlx.fused_decode import FusedStep, position

    a, lw, w = m.args, m.weights.layers[0], m.weights
    fs = FusedStep(m)
    x = mx.random.normal((a.dim,))
    q = mx.random.normal((a.n_heads * a.head_dim,))
    c = mx.random.normal((a.dim,))
    trivial = mx.fast.cuda_kernel(
        name="fused_check_trivial", input_names=["x"], output_names=["out"],
        source=kernels.source("copy.cu"))
    token = mx.array([7, 7], mx.uint32)[:1]
    rows = [  # each maps [dim] -> [dim] (the wider outputs cut to dim: a view, no kernel)
        ("element-wise add, 576 floats", lambda y: y + c),
        ("trivial custom kernel (a copy), 576 floats", lambda y: trivial(
            inputs=[y], template=[("N", a.dim)], output_shapes=[(a.dim,)],
            output_dtypes=[mx.float32], grid=(a.dim, 1, 1), threadgroup=(256, 1, 1))[0]),
        ("embed (once a token)", lambda y: fs.embed(token, w.token_embd)),
        ("norm_qkv_rope", lambda y: fs.norm_qkv_rope(y, lw, position(100),
                                                     mx.float32)[0][:a.dim]),
        ("ffn", lambda y: fs.ffn(y, lw)),
        ("norm_matvec (logits, once a token)", lambda y: fs.norm_matvec(
            y, w.output_norm, w.output)[:a.dim]),
    ]
    kv = mx.random.normal((2 * a.n_kv_heads * a.head_dim,))
    for ctx in (128, 1024, 4096):
        cap = max(256, 1 << ctx.bit_length())  # as the compiled decoder reserves it
        kb = mx.random.normal((a.n_kv_heads, cap, a.head_dim))
        vb = mx.random.normal((a.n_kv_heads, cap, a.head_dim))
        pos = position(ctx)
        mx.eval(kb, vb, kv)
        for warps, unroll in ((8, 2), (16, 2), (16, 4)):
            rows.append((f"attend_project, context {ctx}, {warps} warps, unroll {unroll}",
                         lambda y, kb=kb, vb=vb, pos=pos, nw=warps, u=unroll:
                         fs.attend_project(q, kv, kb, vb, pos, lw.wo, y, nw, u)))
    mx.eval(x, q, c)
    print(f"\nkernel costs ({layout} weights): microseconds per call in a chain of {n}")
    print("| operation | us |\n|---|---|")
    for name, step in rows:
        print(f"| {name} | {per_call(step, x, n):.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=100)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--costs", type=int, default=400, help="calls per kernel-cost row (0: skip)")
    ap.add_argument("--weights", default="float,quantized", help="MLX weight layouts to check")
    args = ap.parse_args()

    from quantref.testing import random_model
    from quantref_mlx.generate import Decoder
    from quantref_mlx.model import from_oracle

    print(f"machine: {machine()}; MLX {mx.__version__} on {mx.default_device()}")
    base = random_model(seed=0)
    twins = {}
    for layout in args.weights.split(","):
        m = from_oracle(base, weights=layout, bits=4, embed_bits=8)
        twins[layout] = (base if layout == "float" else dequantized_oracle(base, m), m)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, base.args.vocab_size, args.ctx).tolist()
    forced = rng.integers(0, base.args.vocab_size, args.steps).tolist()
    identity = lambda logits: logits  # noqa: E731 - the "sampler" that hands the logits back

    print("| weights | KV | path | max rel. diff of logits vs NumPy | arg-max agrees |")
    print("|---|---|---|---|---|")
    for (layout, (np_model, m)), kv in itertools.product(twins.items(), ("fp32", "fp16")):
        ref_cache = np_model.make_cache(kv)
        np_model.forward(prompt, ref_cache, last_only=True)
        ref = [np_model.forward([t], ref_cache, last_only=True)[0] for t in forced]

        paths = {"plain graph": None, "fused": dict(fused=True, compiled=False),
                 "fused, compiled": dict(fused=True, compiled=True)}
        for name, opts in paths.items():
            cache = m.make_cache(kv)
            mx.eval(m.forward(prompt, cache, last_only=True), cache.state())
            dec = None if opts is None else Decoder(m, cache, identity, **opts)
            got = []
            for t in forced:
                token = mx.array([t], mx.uint32)
                logits = m.forward(token, cache, last_only=True) if dec is None else dec(token)
                mx.eval(logits, cache.state())
                got.append(np.array(logits)[0])
            worst = max(rel(g, r) for g, r in zip(got, ref))
            agree = sum(int(np.argmax(g) == np.argmax(r)) for g, r in zip(got, ref))
            print(f"| {layout} | {kv} | {name} | {worst:.2e} | {agree}/{len(ref)} |",
                  flush=True)

    for layout, (_, m) in twins.items():
        kernel_census(m, prompt, layout)
        if args.costs:
            kernel_costs(m, args.costs, layout)


def kernel_census(m, prompt, layout: str) -> None:
    """The operations in one fused step's graph, by kind."""
    from quantref_mlx.fused_decode import FusedStep, position

    cache = m.make_cache("fp32")
    mx.eval(m.forward(prompt, cache, last_only=True), cache.state())
    cache.reserve(256)
    k, v = cache.take_buffers()
    logits, k, v = FusedStep(m)(mx.array([1], mx.uint32), position(cache.length), k, v)
    buf = io.StringIO()
    mx.export_to_dot(buf, mx.argmax(logits, axis=-1), *[a for parts in k + v for a in parts])
    ops = Counter(re.findall(r'label ="([A-Za-z]+)', buf.getvalue()))
    kernels = {o: n for o, n in ops.items() if o not in VIEWS}
    print(f"\nfused step ({layout} weights, fp32 KV): {sum(ops.values())} primitives, "
          f"{sum(kernels.values())} that launch a kernel: "
          + ", ".join(f"{o} {n}" for o, n in sorted(kernels.items(), key=lambda x: -x[1])))


if __name__ == "__main__":
    main()
