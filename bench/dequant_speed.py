"""Dequantization / quantization speed: quantref.quants vs gguf.quants, same run, same data.

    python bench/dequant_speed.py [--weights 4194304] [--repeat 5]

Prints three tables: dequantize per type (random blocks), dequantize of every tensor of the
default model (and gemma's when cached), and quantize per type for a big matrix and for one
KV-cache token ([n_kv_heads=3, 1, head_dim=64], the per-call cost the cache pays). Each
figure is the best of --repeat runs (the machine is shared; the best is the least disturbed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from _common import best_of  # bench/ is the script folder, so on sys.path
from quantref import quants
from quantref.gguf import read as read_gguf


def gguf_dequantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(data, qtype)


def dequantize_table(n_weights: int, repeat: int) -> None:
    print(f"dequantize, {n_weights / 1e6:.1f}M random weights per type "
          "(MB/s of encoded input; Mw/s = million weights per second)")
    print(f"{'type':6} {'ours MB/s':>10} {'gguf MB/s':>10} {'ours Mw/s':>10} {'speedup':>8}")
    rng = np.random.default_rng(0)
    for qtype, (elems, nbytes) in quants.BLOCKS.items():
        n_blocks = n_weights // elems
        raw = rng.integers(0, 256, (n_blocks // 64, 64 * nbytes), np.uint8)  # rows of 64 blocks
        ours = best_of(lambda: quants.dequantize(raw, qtype), repeat)
        ref = best_of(lambda: gguf_dequantize(raw, qtype), repeat)
        mb = raw.nbytes / 1e6
        print(f"{qtype.name:6} {mb / ours:10.0f} {mb / ref:10.0f} "
              f"{raw.size // nbytes * elems / ours / 1e6:10.0f} {ref / ours:7.1f}x")


def model_table(repeat: int) -> None:
    from quantref.fetch import model_path

    print("\ndequantize every tensor of a model (seconds)")
    print(f"{'model':40} {'weights':>8} {'ours s':>8} {'gguf s':>8}")
    paths = [model_path()]
    gemma = Path.home() / ".cache/quantref/gemma-3-270m-q4_k_m.gguf"
    if gemma.exists():
        paths.append(gemma)
    for path in paths:
        with read_gguf(path) as f:
            tensors = [(f.raw(name), info.qtype) for name, info in f.tensors.items()]
            n = sum(info.n_elements for info in f.tensors.values())
            for raw, _ in tensors:
                raw.sum()  # page the file in before timing
            ours = best_of(lambda: [quants.dequantize(r, t) for r, t in tensors], repeat)
            ref = best_of(lambda: [gguf_dequantize(r, t) for r, t in tensors], repeat)
        print(f"{Path(path).name:40} {n / 1e6:7.0f}M {ours:8.2f} {ref:8.2f}")


def quantize_table(repeat: int) -> None:
    print("\nquantize: a 4096 x 1024 matrix (Mw/s) and one KV token [3, 1, 64] (us per call)")
    print(f"{'type':6} {'ours Mw/s':>10} {'gguf Mw/s':>10} {'ours us':>8} {'gguf us':>8}")
    rng = np.random.default_rng(1)
    big = rng.standard_normal((4096, 1024)).astype(np.float32)
    token = rng.standard_normal((3, 1, 64)).astype(np.float32)
    calls = 200
    for qtype in (QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0):
        ours = best_of(lambda: quants.quantize(big, qtype), repeat)
        ref = best_of(lambda: gguf.quants.quantize(big, qtype), repeat)
        ours_1 = best_of(lambda: [quants.quantize(token, qtype) for _ in range(calls)], repeat)
        ref_1 = best_of(lambda: [gguf.quants.quantize(token, qtype) for _ in range(calls)], repeat)
        print(f"{qtype.name:6} {big.size / ours / 1e6:10.0f} {big.size / ref / 1e6:10.0f} "
              f"{ours_1 / calls * 1e6:8.1f} {ref_1 / calls * 1e6:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=int, default=1 << 22, help="weights per type")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (best counts)")
    args = parser.parse_args()
    dequantize_table(args.weights, args.repeat)
    model_table(args.repeat)
    quantize_table(args.repeat)


if __name__ == "__main__":
    main()
