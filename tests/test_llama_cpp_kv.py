"""llama.cpp's quantized KV caches, one attention at a time, against llama.cpp's own output.

``data/llama_cpp_kv/attention.npz`` holds, for each of ``q8_0``, ``q4_0`` (rotated, llama.cpp's
default), ``q8_0_norot`` and ``q4_0_norot`` (``LLAMA_ATTN_ROT_DISABLE=1``), what llama.cpp (the
source llama-cpp-python 0.3.36 vendors, CPU, x86 AVX2) fed its flash attention in layer 27 of
the default model on the first window of ``ppl_1k.txt`` (Q and K after RoPE, V, 32 tokens) and
what came out (``kqv_out``); ``data/llama_cpp_kv/make_attention.py`` says how it was made.
Given llama.cpp's own inputs, the cache must give llama.cpp's output: the same blocks, the
same query conversion to Q8_0, the same integer block sums, only float32 summation order left.
A perplexity comparison cannot show this (a quantized cache's perplexity is chaotic: see
docs/kv_results.md), one attention can: one flipped code moves a row by ~1e-3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantref.cache import GGML_TYPES, hadamard, make_cache, rotation_sizes
from quantref.model import causal_mask, softmax

DATA = Path(__file__).parent / "data" / "llama_cpp_kv" / "attention.npz"
N_KV, N_GROUPS, D = 3, 3, 64  # SmolLM2-135M: 9 query heads over 3 KV heads of 64


@pytest.fixture(scope="module")
def golden():
    with np.load(DATA) as f:
        return {k: f[k] for k in f.files}


def _want(golden, kv: str) -> np.ndarray:
    out = golden[f"{kv}/out"]
    # llama.cpp's kqv_out is still in the rotated V basis; it rotates it back after that node
    return out if kv.endswith("_norot") else hadamard(out, rotation_sizes(D)[1])


def _attend_numpy(kv: str, q, k, v) -> np.ndarray:
    T = q.shape[0]
    cache = make_cache(kv, n_layers=1, n_kv_heads=N_KV, head_dim=D)
    cache.append(0, k.transpose(1, 0, 2), v.transpose(1, 0, 2))
    s = cache.scores(0, q.reshape(T, N_KV, N_GROUPS, D).transpose(1, 2, 0, 3))
    s *= np.float32(1 / 8)  # 1/sqrt(64), exact
    s += causal_mask(T)
    p = softmax(s).reshape(N_KV, N_GROUPS * T, T)
    out = (p @ cache.values(0)).reshape(N_KV, N_GROUPS, T, D)
    return out.transpose(2, 0, 1, 3).reshape(T, N_KV * N_GROUPS * D)


def _rel_rows(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)


@pytest.mark.parametrize("kv", GGML_TYPES)
def test_attention_matches_llama_cpp(golden, kv):
    got = _attend_numpy(kv, golden[f"{kv}/q"], golden[f"{kv}/k"], golden[f"{kv}/v"])
    rel = _rel_rows(got, _want(golden, kv))
    # Measured: 2.8e-7 at most here (on all 30 layers of that window, 128 rows each: 8.6e-7
    # q4_0_norot, 7.5e-7 q8_0_norot, 6.8e-7 q4_0). 1e-5 leaves room for float32 summation order (llama.cpp's online softmax, AVX2 lanes, the rotation
    # back applied to the output rather than to each value); a single K, V or query code
    # that differs moves its row by ~1e-3.
    assert rel.max() < 1e-5, (kv, rel.max(), int(rel.argmax()))


def test_quantization_matters_here(golden):
    # The check has teeth: the plain float32 attention misses llama.cpp's q4_0_norot output
    # by far more than the tolerance above (measured 0.52 relative in the worst row; 0.02
    # for the least lossy type, q8_0).
    kv = "q4_0_norot"
    got = _attend_numpy("fp32", golden[f"{kv}/q"], golden[f"{kv}/k"], golden[f"{kv}/v"])
    assert _rel_rows(got, _want(golden, kv)).max() > 1e-3


@pytest.mark.parametrize("kv", GGML_TYPES)
def test_mlx_attention_matches_llama_cpp(golden, kv):
    mx = pytest.importorskip("mlx.core")
    from quantref_mlx.cache import make_cache as mx_make_cache

    q, k, v = (golden[f"{kv}/{n}"] for n in "qkv")
    T = q.shape[0]
    cache = mx_make_cache(kv, n_layers=1, n_kv_heads=N_KV, head_dim=D)
    cache.append(0, mx.array(k.transpose(1, 0, 2)), mx.array(v.transpose(1, 0, 2)))
    s = cache.scores(0, mx.array(q.reshape(T, N_KV, N_GROUPS, D).transpose(1, 2, 0, 3)))
    s = np.array(s) * np.float32(1 / 8) + causal_mask(T)
    p = softmax(s).reshape(N_KV, N_GROUPS * T, T)
    out = (p @ np.array(cache.values(0))).reshape(N_KV, N_GROUPS, T, D)
    got = out.transpose(2, 0, 1, 3).reshape(T, N_KV * N_GROUPS * D)
    rel = _rel_rows(got, _want(golden, kv))
    assert rel.max() < 1e-5, (kv, rel.max(), int(rel.argmax()))  # as the NumPy half's
