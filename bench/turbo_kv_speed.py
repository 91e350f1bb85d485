"""Throughput of the turbo_kv oracle on random keys: quantize, dequantize, scores per path.

    python bench/turbo_kv_speed.py [--n 100000] [--dims 64,128,256] [--repeat 3] [--cpu-time]

For each kind and head size ``d``: ``quantize`` and ``dequantize`` of ``n`` Gaussian vectors
(vectors/s), and ``scores`` shaped like one decode step of the KV cache (``n_kv_heads = 4`` query
groups of ``M = 4`` queries against ``L = 2048`` keys each), given as keys/s (``n_kv * L`` keys
scored per call, all ``M`` queries included). Each figure is the best of ``--repeat`` runs
(``5 * --repeat`` for the short ``scores`` calls): best-of timing filters out other processes on
a shared machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import best_of, machine
from quantref import turbo_kv as tk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="vectors per quantize/dequantize run")
    ap.add_argument("--dims", default="64,128,256", help="head sizes, comma-separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--queries", type=int, default=4, help="queries per KV head (M)")
    ap.add_argument("--keys", type=int, default=2048, help="cached keys per KV head (L)")
    ap.add_argument("--cpu-time", action="store_true", help="time by this process's CPU time "
                    "(time.process_time) instead of wall time: for a machine shared with other "
                    "work; set OPENBLAS_NUM_THREADS=1 with it, so that CPU time is wall time")
    args = ap.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter

    rng = np.random.default_rng(0)
    print(f"machine: {machine()}")
    print(f"quantize/dequantize: {args.n} vectors; scores: {args.kv_heads} KV heads x "
          f"{args.queries} queries x {args.keys} keys per call; best of {args.repeat}"
          + ("; CPU time" if args.cpu_time else "; wall time"))
    cols = ["kind", "d", "quantize vec/s", "dequantize vec/s"] + [f"scores {p} keys/s"
                                                                 for p in tk.PATHS]
    widths = [12, 4, 15, 17] + [max(len(c), 12) for c in cols[4:]]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for d in (int(v) for v in args.dims.split(",")):
        x = rng.standard_normal((args.n, d)).astype(np.float32)
        keys = rng.standard_normal((args.kv_heads, args.keys, d)).astype(np.float32)
        q = rng.standard_normal((args.kv_heads, args.queries, d)).astype(np.float32)
        for kind in tk.KINDS:
            t_q = best_of(lambda: tk.quantize(x, kind), args.repeat, clock)
            blocks = tk.quantize(x, kind)
            t_d = best_of(lambda: tk.dequantize(blocks, kind, d), args.repeat, clock)
            cache = tk.quantize(keys, kind)
            row = [kind, str(d), f"{args.n / t_q:,.0f}", f"{args.n / t_d:,.0f}"]
            for path in tk.PATHS:
                t_s = best_of(lambda: tk.scores(q, cache, kind, d, path=path),
                              5 * args.repeat, clock)
                row.append(f"{args.kv_heads * args.keys / t_s:,.0f}")
            print("  ".join(c.rjust(w) for c, w in zip(row, widths)), flush=True)


if __name__ == "__main__":
    main()
