"""The NumPy forward pass: against an independent naive implementation, prefill vs decode,
errors, and the real default model."""

from __future__ import annotations

import math

import numpy as np
import pytest

import quantref
from quantref import gguf
from quantref.model import ModelArgs, UnsupportedModelError, rope, rope_tables
from quantref.testing import write_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("m") / "tiny.gguf", n_layers=2, dim=64,
                            n_heads=4, n_kv_heads=2, hidden_dim=160, seed=1)
    return quantref.load(path)


@pytest.fixture(scope="module")
def tiny_rope_freqs(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("m") / "tiny_rf.gguf", n_layers=2, dim=64,
                            n_heads=4, n_kv_heads=1, hidden_dim=96, rope_freqs=True,
                            tied_embeddings=False, rope_base=500000.0, seed=2)
    return quantref.load(path)


def naive_forward(m: quantref.Model, ids: list[int]) -> np.ndarray:
    """An independent, loop-by-loop float64 Llama forward pass, written the way Meta's
    reference code states it: RoPE as complex multiplication of adjacent pairs, attention
    head by head and query by query."""
    a, w = m.args, m.weights
    x = w.token_embd[ids].astype(np.float64)
    T = len(ids)
    half = a.rope_dim // 2
    freqs = a.rope_base ** (-np.arange(half) * 2.0 / a.rope_dim)
    if w.rope_freqs is not None:
        freqs = freqs / w.rope_freqs
    rot = np.exp(1j * np.outer(np.arange(T), freqs))  # [T, half]

    def norm(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + a.norm_eps) * g

    def apply_rope(v):  # v [T, heads, head_dim]
        c = v[..., 0::2] + 1j * v[..., 1::2]
        c = c * rot[:, None, :]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = c.real, c.imag
        return out

    for lw in w.layers:
        h = norm(x, lw.attn_norm)
        q = apply_rope((h @ lw.wq.T).reshape(T, a.n_heads, a.head_dim))
        k = apply_rope((h @ lw.wk.T).reshape(T, a.n_kv_heads, a.head_dim))
        v = (h @ lw.wv.T).reshape(T, a.n_kv_heads, a.head_dim)
        att = np.zeros((T, a.n_heads, a.head_dim))
        for head in range(a.n_heads):
            kv = head * a.n_kv_heads // a.n_heads
            for t in range(T):
                s = k[: t + 1, kv] @ q[t, head] / math.sqrt(a.head_dim)
                p = np.exp(s - s.max())
                att[t, head] = (p / p.sum()) @ v[: t + 1, kv]
        x = x + att.reshape(T, -1) @ lw.wo.T
        h = norm(x, lw.ffn_norm)
        g = h @ lw.w_gate.T
        x = x + (g / (1 + np.exp(-g)) * (h @ lw.w_up.T)) @ lw.w_down.T
    return norm(x, w.output_norm) @ w.output.T


IDS = [5, 77, 100, 3, 260, 42, 42, 199, 7, 150, 33, 1, 90]


@pytest.mark.parametrize("which", ["tiny", "tiny_rope_freqs"])
def test_forward_matches_naive_float64_reference(which, request):
    m = request.getfixturevalue(which)
    got = m.forward(IDS)
    assert got.shape == (len(IDS), m.args.vocab_size) and got.dtype == np.float32
    want = naive_forward(m, IDS)
    # float32 against float64 over 2 layers of O(1) activations: float32 rounding (~6e-8
    # relative per op) accumulated over a few hundred-term dot products stays far below 1e-4.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_gqa_maps_query_heads_to_consecutive_kv_heads(tiny):
    # With 4 query heads over 2 KV heads, heads 0,1 read KV head 0 and heads 2,3 KV head 1
    # (llama.cpp's broadcast). The naive reference states that mapping independently; break it
    # by swapping the two KV heads' weights and the result must change.
    base = tiny.forward(IDS)
    lw = tiny.weights.layers[0]
    hd = tiny.args.head_dim
    saved = lw.wk.copy(), lw.wv.copy()
    try:
        for w in (lw.wk, lw.wv):
            w[:] = np.concatenate([w[hd:], w[:hd]])
        assert not np.allclose(tiny.forward(IDS), base, atol=1e-3)
        np.testing.assert_allclose(tiny.forward(IDS), naive_forward(tiny, IDS), atol=1e-4 * 10)
    finally:
        lw.wk[:], lw.wv[:] = saved


@pytest.mark.parametrize("kv", ["fp32", "fp16"])
def test_prefill_equals_one_token_at_a_time(tiny, kv):
    full = tiny.forward(IDS, tiny.make_cache(kv))
    cache = tiny.make_cache(kv)
    steps = np.concatenate([tiny.forward([t], cache) for t in IDS])
    # Same arithmetic, different BLAS blocking (matrix-matrix vs matrix-vector): float32
    # reassociation only, ~1e-6 of the logits' scale.
    np.testing.assert_allclose(steps, full, rtol=0, atol=1e-5 * np.abs(full).max())
    cache = tiny.make_cache(kv)
    chunks = np.concatenate([tiny.forward(IDS[i:i + 5], cache) for i in range(0, len(IDS), 5)])
    np.testing.assert_allclose(chunks, full, rtol=0, atol=1e-5 * np.abs(full).max())
    assert cache.length == len(IDS)


def test_last_only_and_errors(tiny):
    full = tiny.forward(IDS)
    # one row through the output projection instead of 13: BLAS blocking differs (reassociation)
    np.testing.assert_allclose(tiny.forward(IDS, last_only=True), full[-1:], rtol=0,
                               atol=1e-5 * np.abs(full).max())
    with pytest.raises(ValueError, match="token id 999"):
        tiny.forward([1, 999])
    with pytest.raises(ValueError, match="at least one"):
        tiny.forward([])


def test_rope_rotates_adjacent_pairs_and_preserves_norm():
    args = ModelArgs(vocab_size=1, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8,
                     hidden_dim=8, norm_eps=1e-5, rope_base=10000.0, rope_dim=8, rope_scale=1.0,
                     max_seq_len=16, tied_embeddings=True)
    x = np.random.default_rng(0).standard_normal((5, 1, 8)).astype(np.float32)
    cos, sin = rope_tables(np.arange(5), args)
    y = rope(x, cos, sin)
    np.testing.assert_array_equal(y[0], x[0])  # position 0 turns by 0
    # each pair keeps its length (rotation), to float32 rounding
    pairs = lambda v: np.hypot(v[..., 0::2], v[..., 1::2])  # noqa: E731
    np.testing.assert_allclose(pairs(y), pairs(x), rtol=1e-6)
    # pair 0 at position 1 turns by exactly 1 radian (base^0 = 1)
    angle = np.arctan2(y[1, 0, 1], y[1, 0, 0]) - np.arctan2(x[1, 0, 1], x[1, 0, 0])
    assert math.isclose((angle + math.pi) % (2 * math.pi) - math.pi, 1.0, abs_tol=1e-5)


def test_other_architectures_are_refused(tmp_path):
    src = write_tiny_llama(tmp_path / "t.gguf")
    with gguf.read(src) as gf:
        md = {("falcon." + k[len("llama."):] if k.startswith("llama.") else k): v
              for k, v in gf.metadata.items()}
        types = {("falcon." + k[len("llama."):] if k.startswith("llama.") else k): v
                 for k, v in gf.types.items()}
        md["general.architecture"] = "falcon"
        tensors = {n: (np.array(gf.raw(n)), t.qtype, t.shape) for n, t in gf.tensors.items()}
        gguf.write(tmp_path / "falcon.gguf", md, types, tensors)
    with pytest.raises(UnsupportedModelError,
                       match=r"'falcon' is not supported; supported: llama, qwen2, qwen3, phi3, "
                             r"gemma3"):
        quantref.load(tmp_path / "falcon.gguf")


def test_missing_tensor_is_named(tmp_path):
    src = write_tiny_llama(tmp_path / "t.gguf")
    with gguf.read(src) as gf:
        tensors = {n: (np.array(gf.raw(n)), t.qtype, t.shape) for n, t in gf.tensors.items()
                   if n != "blk.1.ffn_up.weight"}
        gguf.write(tmp_path / "broken.gguf", gf.metadata, gf.types, tensors)
    with pytest.raises(UnsupportedModelError, match="blk.1.ffn_up.weight"):
        quantref.load(tmp_path / "broken.gguf")


@pytest.mark.model
def test_default_model_loads_with_its_hyperparameters(default_model_path):
    m = quantref.load(default_model_path)
    a = m.args
    assert (a.n_layers, a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.hidden_dim) == \
        (30, 576, 9, 3, 64, 1536)
    assert a.vocab_size == 49152 and a.tied_embeddings and a.rope_base == 100000.0
    assert m.weights.output is m.weights.token_embd
    assert 134_000_000 < m.n_params < 136_000_000
    # Weights are float32 and equal to gguf-py's dequantization of the file.
    from gguf import GGUFReader
    from gguf.quants import dequantize

    t = next(t for t in GGUFReader(default_model_path).tensors if t.name == "blk.7.ffn_down.weight")
    np.testing.assert_array_equal(m.weights.layers[7].w_down,
                                  dequantize(t.data, t.tensor_type).reshape(576, 1536))
