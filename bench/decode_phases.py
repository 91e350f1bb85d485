"""Where a lazy MLX decode step's time goes: building the step's graph (Python), MLX encoding it
(``mx.async_eval``: host time), and waiting for the previous token; and what MLX itself costs
per kernel, on a chain of trivial custom kernels (CUDA only).

    python bench/decode_phases.py [--weights quantized] [--steps 100] [--ctx 128] [--persistent]
    python bench/decode_phases.py --persistent --no-host --forms rows --generation-only \
        --ctx 128,4096 --kv fp16 --row-keys 0,32,64 --row-unroll 4,8  # rows form's splits

``--persistent`` adds the persistent step (``quantref_mlx.persistent_decode``): the same split of
host and device time, then inside its one launch the time of each kind of phase (block 0 reads
the GPU's global timer as it leaves each grid barrier; the host reads them every fourth step),
and the time per token of the step without its marks, as generation runs it (``--blocks``,
``--warps``: other grids than one block of 16 warps per SM). Its steps
advance the context: a row at ``--ctx`` N averages positions N to about N + 5 ``--steps``.

Random weights of SmolLM2-135M's shapes (``--bits 4 --embed-bits 8``, as SmolLM2's Q4_1 file),
``Decoder`` as generation runs it: step n+1 built and started before token n is read back. The
capacity is reserved first, so that no step retraces inside the timed loop. If building plus
encoding take about as long as a token, the host bounds the step, not the GPU.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np

from _common import machine


def phases(model, kv: str, ctx: int, steps: int, **decoder_options) -> dict:
    """Microseconds per token of each phase of ``steps`` decoded tokens after ``ctx``
    (``decoder_options``: :class:`quantref_mlx.generate.Decoder`'s, e.g. ``persistent=True``)."""
    from quantref.generate import SamplerArgs
    from quantref_mlx.cache import STEP
    from quantref_mlx.generate import Decoder, make_sampler

    sampler = make_sampler(SamplerArgs())
    cache = model.make_cache(kv)
    logits = model.forward(list(range(1, ctx + 1)), cache, last_only=True)
    mx.eval(logits, cache.state())
    cache.reserve(max(STEP, 1 << (ctx + steps + 24).bit_length()))
    decoder = Decoder(model, cache, sampler, **decoder_options)
    y = sampler(logits)
    # a persistent step of K tokens a launch: whole launches, warm-up and timed
    k = decoder.persistent.steps if decoder.persistent is not None else 1
    steps = -(-steps // k) * k
    for _ in range(max(3, k)):  # warm-up: the first compiled call traces
        y = decoder(y)
        y.item()
    if k > 1:  # as bench/decode_speed.py's timed_decode: whole launches from a new start
        mx.synchronize()
        y = mx.array(np.array(y))
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


QUIET = 3  # steps between two the host reads the timer marks of (persistent_marks)


def persistent_marks(model, kv: str, ctx: int, steps: int, sync: str = "grid",
                     rows: dict | None = None, marks: bool = True) -> dict:
    """Inside the persistent kernel (``FD_TIMES``): microseconds per token of each kind of
    phase, from the global timer block 0 reads as it leaves each barrier, averaged over
    ``steps`` tokens; and the time per token of ``steps`` tokens of the step without marks, as
    generation runs it (each token read back while the next step runs).
    ``rows``: the rows form's options (``PersistentStep``'s ``row_keys``, ``row_unroll``,
    ``row_group``, ``blocks``, ``warps``);
    ``marks=False``: that time only (one kernel compiled, not two)."""

    from quantref.generate import SamplerArgs
    from quantref_mlx import fused_decode as fd
    from quantref_mlx import persistent_decode as pd
    from quantref_mlx.generate import Decoder, make_sampler

    sampler = make_sampler(SamplerArgs())
    cache = model.make_cache(kv)
    logits = model.forward(list(range(1, ctx + 1)), cache, last_only=True)
    mx.eval(logits, cache.state())
    # every step the run takes (the marks' 1 + QUIET a reading, the timed ones), so that the
    # capacity, and with it the fused form's splits, stays one for the whole run
    cache.reserve(max(256, 1 << (ctx + (steps + 2) * (QUIET + 1) + steps + 8).bit_length()))
    # sync: "grid", "release", "flags" (the fused form's), "rows" or "rows:release"
    how, _, barrier = sync.partition(":")
    if barrier and how != "rows":
        raise SystemExit(f"--forms: {sync!r}: only the rows form takes a barrier after ':'")
    form = (dict(sync=barrier or "grid", form="rows", **(rows or {})) if how == "rows"
            else dict(sync=how))
    dec = Decoder(model, cache, sampler, persistent=how if how != "release" else "grid")
    dec.persistent = pd.PersistentStep(model, fd.TurboSpec.of(cache), times=True, **form)
    y = sampler(logits)
    a = model.args
    splits = max(1, min(fd.ATTEND_MAX_SPLITS, cache.capacity // fd.ATTEND_SPLIT_KEYS))
    if how == "rows":
        per_layer = ["qkv", "attention", "wo", "gate_up", "down"]
    else:
        per_layer = ["qkv", "attention"] + (["merge"] if splits > 1 or dec.persistent.turbo
                                            else []) + ["ffn"]
    # one mark per barrier: the embedding's, each layer's phases', the logits' (the argmax of
    # the blocks' bests, by block 0 after the last barrier, has none: its time is not counted)
    names = ["embedding"] + per_layer * a.n_layers + ["logits"]
    sums = dict.fromkeys(["embedding", *per_layer, "logits"], 0.0)
    skew = arrive = 0.0
    late = {}  # block: how many steps it was the last at the first barrier
    for i in range(steps + 2 if marks else 0):
        # the host reads the scratch (the marks) once every QUIET + 1 steps, so that the step
        # it reads ran with no host access to the scratch since the last reading (MLX may keep
        # it in managed memory, whose pages a host read would pull over, and the next step
        # fault back)
        for _ in range(QUIET):
            y = dec(y)
        mx.eval(y)
        y = dec(y)
        dec.check(y.item())
        if i < 2:
            continue  # the first launches compile and probe
        t = dec.persistent.marks()[:len(names)].astype(np.float64) / 1e3  # us since the start
        skew += float(dec.persistent.starts().max()) / 1e3
        arrivals = dec.persistent.arrivals()
        arrive += float(arrivals.max()) / 1e3
        late[int(arrivals.argmax())] = late.get(int(arrivals.argmax()), 0) + 1
        for name, d in zip(names, np.diff(np.concatenate([[0.0], t]))):
            sums[name] += d
    out = {k: v / steps for k, v in sums.items()} if marks else {}
    out["skew"] = skew / steps if marks else float("nan")  # us, block 0's start to the last's
    # us from block 0's start to the last block's arrival at the first barrier
    out["arrive"] = arrive / steps if marks else float("nan")
    out["late"] = max(late, key=late.get) if late else "-"
    out["barriers"] = len(names)
    # the step without its marks, as generation runs it: step n + 1 queued before token n is
    # read back (the host's time hidden behind the device's: docs/benchmarks.md section 4)
    dec.persistent = pd.PersistentStep(model, fd.TurboSpec.of(cache), **form)
    for _ in range(2):
        y = dec(y)
        dec.check(y.item())
    start = time.perf_counter()
    for _ in range(steps):
        nxt = dec(y)
        mx.async_eval(nxt)
        dec.check(y.item())
        y = nxt
    dec.check(y.item())
    out["generation"] = (time.perf_counter() - start) / steps * 1e6
    out["warps"] = dec.persistent.warps
    out["blocks"] = dec.persistent.blocks
    out["rows"] = (f"{dec.persistent.row_keys} / {dec.persistent.row_unroll}"
                   + (" / group" if dec.persistent.row_group else ""))
    return out


def trivial_chain(n: int, reps: int = 20) -> tuple[float, float]:
    """(end-to-end, host-only) microseconds per kernel of a chain of ``n`` trivial custom
    kernels (a copy of 576 floats, each reading the last one's output)."""
    from quantref_mlx import kernels

    copy = mx.fast.cuda_kernel(
        name="phases_trivial", input_names=["x"], output_names=["out"],
        source=kernels.source("copy.cu"))
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
    ap.add_argument("--ctx", default="128", help="contexts, comma-separated")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--kv", default="fp16,fp32")
    ap.add_argument("--forms", default="grid,flags,rows",
                    help="the persistent step's forms: grid, release, flags (the fused form's "
                         "three syncs), rows, rows:release")
    ap.add_argument("--row-keys", default=None,
                    help="the rows form's positions a split, comma-separated (default: its own)")
    ap.add_argument("--row-unroll", default=None,
                    help="the rows form's keys a warp loads at once, comma-separated")
    ap.add_argument("--row-group", default=None,
                    help="the rows form's attention a block per KV head (1) or per head (0), "
                         "comma-separated")
    ap.add_argument("--blocks", default=None,
                    help="the rows form's blocks (default: one per SM), comma-separated")
    ap.add_argument("--warps", default=None,
                    help="the rows form's warps a block (default: its own), "
                         "comma-separated")
    ap.add_argument("--generation-only", action="store_true",
                    help="the persistent step's time as generation runs it only (no timer "
                         "marks)")
    ap.add_argument("--no-host", action="store_true",
                    help="skip the host-and-device tables (the persistent step's inside only)")
    ap.add_argument("--persistent", action="store_true",
                    help="also the persistent step: host and device time, and its phases (CUDA)")
    args = ap.parse_args()

    from quantref.testing import random_model
    from quantref_mlx.model import from_oracle

    model = from_oracle(random_model(seed=0), weights=args.weights, bits=4, embed_bits=8)
    contexts = [int(c) for c in args.ctx.split(",")]
    kvs = args.kv.split(",")
    print(f"machine: {machine()}")
    print(f"weights {args.weights}, contexts {args.ctx}, {args.steps} steps")
    for ctx in contexts if not args.no_host else []:
        print(f"\nContext {ctx}, the fused step:")
        print("| KV | build us | async_eval us | wait us | total us | tokens/s |")
        print("|---|---|---|---|---|---|")
        for kv in kvs:
            p = phases(model, kv, ctx, args.steps)
            print(f"| {kv} | {p['build']:.1f} | {p['encode']:.1f} | {p['wait']:.1f} | "
                  f"{p['total']:.1f} | {p['tokens_s']:.1f} |", flush=True)
        if args.persistent:
            print("\nThe persistent step (one launch a token), as generation runs it:")
            print("| KV | build us | async_eval us | wait us | total us | tokens/s |")
            print("|---|---|---|---|---|---|")
            for kv in kvs:
                p = phases(model, kv, ctx, args.steps, persistent=True)
                print(f"| {kv} | {p['build']:.1f} | {p['encode']:.1f} | {p['wait']:.1f} | "
                      f"{p['total']:.1f} | {p['tokens_s']:.1f} |", flush=True)
    if args.persistent:
        print("\nInside it: us per token of each kind of phase (each ends at a grid barrier), "
              "and the time per token of the step without them as generation runs it:")
        print("| ctx | KV | form | row keys / unroll (/ group) | blocks x warps | phases | last block starts | "
              "last block at the first barrier | embedding | qkv | attention | merge (or Wo) | ffn (gate,up + down) | logits | "
              "sum | generation us/token |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        keys = [None] if args.row_keys is None else [int(k) for k in args.row_keys.split(",")]
        unrolls = [None] if args.row_unroll is None else [
            int(u) for u in args.row_unroll.split(",")]
        groups = [None] if args.row_group is None else [
            bool(int(x)) for x in args.row_group.split(",")]
        blocks = [None] if args.blocks is None else [int(b) for b in args.blocks.split(",")]
        warps = [None] if args.warps is None else [int(w) for w in args.warps.split(",")]
        rows = [{k: v for k, v in (("row_keys", key), ("row_unroll", u), ("row_group", grp),
                                   ("blocks", nb), ("warps", nw)) if v is not None}
                for key in keys for u in unrolls for grp in groups for nb in blocks
                for nw in warps]
        runs = [(c, kv, f, r) for c in contexts for kv in kvs for f in args.forms.split(",")
                for r in (rows if f.startswith("rows") else [None])]
        for ctx, kv, sync, k in runs:
            m = persistent_marks(model, kv, ctx, args.steps, sync, k, not args.generation_only)
            parts = [m.get("embedding", 0.0), m.get("qkv", 0.0), m.get("attention", 0.0),
                     m.get("merge", 0.0) + m.get("wo", 0.0),
                     m.get("ffn", 0.0) + m.get("gate_up", 0.0) + m.get("down", 0.0),
                     m.get("logits", 0.0)]
            print(f"| {ctx} | {kv} | {sync} | {m['rows'] if sync.startswith('rows') else '-'} | "
                  f"{m['blocks']} x {m['warps']} | {m['barriers']} | {m['skew']:.1f} | "
                  f"{m['arrive']:.1f} (block {m['late']}) | "
                  + " | ".join(f"{x:.1f}" for x in parts)
                  + f" | {sum(parts):.1f} | {m['generation']:.1f} |", flush=True)
    if not args.no_host and getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        print("\n| chain of trivial custom kernels | us per kernel | of which host |")
        print("|---|---|---|")
        for n in (50, 150, 300):
            total, host = trivial_chain(n)
            print(f"| {n} | {total:.2f} | {host:.2f} |")


if __name__ == "__main__":
    main()
