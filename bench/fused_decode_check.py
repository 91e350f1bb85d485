"""The fused decode step (``quantref_mlx.fused_decode``) against the plain MLX graph and the NumPy
oracle, on a CUDA GPU (the only place its kernels run).

    python bench/fused_decode_check.py [--ctx 100] [--steps 48]

Random float weights of SmolLM2-135M's shapes. For fp32 and fp16 caches, one prompt is prefilled
into a NumPy cache and MLX caches, then the same forced tokens are decoded by each path: the
oracle, MLX's plain graph, the fused step (through ``Decoder``, eager and compiled). Per path: the
largest difference of a step's logits from the oracle's, relative to the largest |logit|, over
all steps, and how often the arg-max agrees. Also: the operations in one fused step's graph.
"""

from __future__ import annotations

import argparse
import io
import re
from collections import Counter

import mlx.core as mx
import numpy as np

from _common import machine
from mlx_kernels import VIEWS  # primitives that launch no kernel


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def per_call(make, n: int) -> float:
    """Microseconds per call of ``make()`` when ``n`` calls are evaluated together (lazy)."""
    import time

    mx.eval([make() for _ in range(4)])  # compile (JIT) and warm up
    calls = [make() for _ in range(n)]
    t = time.perf_counter()
    mx.eval(calls)
    return (time.perf_counter() - t) / n * 1e6


def kernel_costs(m, n: int) -> None:
    """What each kind of operation of a fused step costs, evaluated n at a time."""
    from quantref_mlx.fused_decode import FusedStep, position

    a, lw = m.args, m.weights.layers[0]
    fs = FusedStep(m)
    x = mx.random.normal((a.dim,))
    q = mx.random.normal((a.n_heads * a.head_dim,))
    hmid = mx.random.normal((a.hidden_dim,))
    trivial = mx.fast.cuda_kernel(
        name="fused_check_trivial", input_names=["x"], output_names=["out"],
        source="const int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < N) out[i] = x[i];")
    rows = [
        ("element-wise (x + 1), 576 floats", lambda: x + 1),
        ("trivial custom kernel, 576 floats", lambda: trivial(
            inputs=[x], template=[("N", a.dim)], output_shapes=[(a.dim,)],
            output_dtypes=[mx.float32], grid=(a.dim, 1, 1), threadgroup=(256, 1, 1))[0]),
        ("norm_qkv_rope", lambda: fs.norm_qkv_rope(x, lw, position(100),
                                                   mx.float32)[0]),
        ("matvec_add (wo)", lambda: fs.matvec_add(q, lw.wo.weight, x)),
        ("norm_gate_up_swiglu", lambda: fs.norm_gate_up_swiglu(x, lw)),
        ("matvec_add (down)", lambda: fs.matvec_add(hmid, lw.w_down.weight, x)),
        ("norm_matvec (logits, once a token)", lambda: fs.norm_matvec(
            x, m.weights.output_norm, m.weights.output.weight)),
    ]
    kv = mx.random.normal((2 * a.n_kv_heads * a.head_dim,))
    for ctx in (128, 1024, 4096):
        cap = -(-(ctx + 1) // 256) * 256
        kb = mx.random.normal((a.n_kv_heads, cap, a.head_dim))
        vb = mx.random.normal((a.n_kv_heads, cap, a.head_dim))
        pos = position(ctx)
        mx.eval(kb, vb, kv)
        for warps, unroll in ((8, 1), (16, 4), (32, 4), (32, 8)):
            rows.append((f"attend, context {ctx}, {warps} warps, unroll {unroll}",
                         lambda kb=kb, vb=vb, pos=pos, w=warps, u=unroll:
                         fs.attend(q, kv, kb, vb, pos, w, u)))
    mx.eval(x, q, hmid)
    print(f"\nkernel costs: {n} calls evaluated together, microseconds per call")
    print("| operation | us |\n|---|---|")
    for name, make in rows:
        print(f"| {name} | {per_call(make, n):.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx", type=int, default=100)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--costs", type=int, default=400, help="calls per kernel-cost row (0: skip)")
    args = ap.parse_args()

    from quantref.testing import random_model
    from quantref_mlx.fused_decode import FusedStep, position
    from quantref_mlx.generate import Decoder
    from quantref_mlx.model import from_oracle

    print(f"machine: {machine()}; MLX {mx.__version__} on {mx.default_device()}")
    np_model = random_model(seed=0)
    m = from_oracle(np_model, weights="float")
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, m.args.vocab_size, args.ctx).tolist()
    forced = rng.integers(0, m.args.vocab_size, args.steps).tolist()
    identity = lambda logits: logits  # noqa: E731 - the "sampler" that hands the logits back

    print("| KV | path | max rel. diff of logits vs NumPy | arg-max agrees |")
    print("|---|---|---|---|")
    for kv in ("fp32", "fp16"):
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
            print(f"| {kv} | {name} | {worst:.2e} | {agree}/{len(ref)} |", flush=True)

    cache = m.make_cache("fp32")
    mx.eval(m.forward(prompt, cache, last_only=True), cache.state())
    cache.reserve(256)
    k, v = cache.take_buffers()
    logits, k, v = FusedStep(m)(mx.array([1], mx.uint32), position(cache.length), k, v)
    buf = io.StringIO()
    mx.export_to_dot(buf, mx.argmax(logits, axis=-1), *[a for parts in k + v for a in parts])
    ops = Counter(re.findall(r'label ="([A-Za-z]+)', buf.getvalue()))
    kernels = {o: n for o, n in ops.items() if o not in VIEWS}
    print(f"\nfused step (fp32 KV): {sum(ops.values())} primitives, {sum(kernels.values())} "
          "that launch a kernel: " + ", ".join(f"{o} {n}" for o, n in
                                               sorted(kernels.items(), key=lambda x: -x[1])))
    if args.costs:
        kernel_costs(m, args.costs)


if __name__ == "__main__":
    main()
