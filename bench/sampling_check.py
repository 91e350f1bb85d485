"""The MLX sampler on whatever device MLX picks (a GPU when there is one): llama.cpp's golden
tokens (tests/data/sampling/llama_cpp_chain.*) replayed, and the cost of one sampled token.

    python bench/sampling_check.py

On the lent GPU machine (docs/mlx.md: MLX's CUDA backend from ../shared/device/mlx-cuda):
    bash .device/mlx-cuda/install.sh && export PYTHONPATH=/tmp/site:$PWD && python3 bench/sampling_check.py
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from quantref.generate import SamplerArgs, SamplerRNG, sample

mg = importlib.import_module("quantref_mlx.generate")  # quantref_mlx.generate is the function
DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "sampling"
NAMES = ("temp", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
         "frequency_penalty", "presence_penalty")


def main() -> None:
    print("device", mx.default_device())
    meta = json.loads((DATA / "llama_cpp_chain.json").read_text())
    with np.load(DATA / "llama_cpp_chain.npz") as z:
        logits = [z[f"logits_{i}"] for i in range(len(meta))]
    bad = 0
    for i, c in enumerate(meta):
        s = mg.make_sampler(SamplerArgs(**{k: c[k] for k in NAMES}), SamplerRNG(c["seed"]),
                            c["history"])
        x = mx.array(logits[i])[None]
        got = [s(x).item() for _ in range(c["steps"])]
        if got != c["llama_cpp_tokens"]:
            bad += 1
            print("mismatch", i, got, c["llama_cpp_tokens"])
    print(f"golden: {len(meta) - bad}/{len(meta)} cases equal to llama.cpp's tokens")

    lg = (np.random.default_rng(0).standard_normal(49152) * 6).astype(np.float32)
    x, history = mx.array(lg)[None], list(range(64))
    for a in [SamplerArgs(), SamplerArgs(temp=0.8), SamplerArgs(temp=0.8, top_k=40),
              SamplerArgs(temp=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1),
              SamplerArgs(temp=0.8, top_p=0.9), SamplerArgs(temp=0.8, min_p=0.05)]:
        s = mg.make_sampler(a, SamplerRNG(1), history)
        for _ in range(5):
            mx.eval(s(x))
        t = time.perf_counter()
        for _ in range(200):
            mx.eval(s(x))
        dt = (time.perf_counter() - t) / 200
        same = sample(lg, a, SamplerRNG(1), history) == \
            mg.make_sampler(a, SamplerRNG(1), history)(x).item()
        print(f"temp={a.temp} top_k={a.top_k} top_p={a.top_p} min_p={a.min_p} "
              f"repeat_penalty={a.repeat_penalty}: {dt * 1e3:.3f} ms per sampled token "
              f"(vocab 49152, evaluated alone, 200 draws); first draw equals NumPy's: {same}")


if __name__ == "__main__":
    main()
