"""The fused decode step with turbo_kv caches, on a CUDA GPU (the only place its kernels run;
CPU CI skips this file; ``tools/nvrtc_check.py`` compiles the kernels without a GPU).

    python -m pytest -q tests/test_fused_decode_gpu.py          # on the GPU machine

Checked against the NumPy oracle (``quantref.turbo_kv``) on the same data, for every kind, score
path, value type, with and without a k-window, and two head sizes:
- the block this token's key becomes inside the kernel is the oracle's, byte for byte, and so are
  its stored value bytes;
- every score the kernel computes from the stored blocks is within 1e-5 of its row's largest
  (the golden tolerance of quant.cpp's own vectors: float32 sums in another order), and the
  attention output from them matches;
- whole decode steps match the plain MLX graph's logits, and on the default model greedy
  decoding with turbo_kv_4b / 5b gives the oracle's tokens.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from quantref import turbo_kv as tk
from quantref.testing import random_model

mx = pytest.importorskip("mlx.core")
from quantref_mlx import fused_decode as fd  # noqa: E402
from quantref_mlx.generate import Decoder  # noqa: E402
from quantref_mlx.model import from_oracle  # noqa: E402

CUDA = getattr(mx, "cuda", None) is not None and mx.cuda.is_available() \
    and mx.default_device().type == mx.DeviceType.gpu
pytestmark = pytest.mark.skipif(not CUDA, reason="the fused kernels run on CUDA GPUs only")

V_TYPES = ("fp16", "fp32", "q4", "q2")
# every kind x score path x value type x k-window (72 kernels, each compiled on first use)
CONFIGS = list(itertools.product(tk.KINDS, tk.PATHS, V_TYPES, (0, 5)))
IDS = [f"{k[-2:]}-{p.split('_')[0]}-{v}-w{w}" for k, p, v, w in CONFIGS]
# for the second head size: every path x value type, kinds and window in rotation
SOME = [(tk.KINDS[i % 3], p, v, 5 * (i % 2))
        for i, (p, v) in enumerate(itertools.product(tk.PATHS, V_TYPES))]


@pytest.fixture(scope="module", params=[64, 32], ids=["hd64", "hd32"])
def model(request):
    """Random float weights; head_dim 64 and three query heads per KV head as SmolLM2, or 32
    and two."""
    hd = request.param
    nh, nkv = (6, 2) if hd == 64 else (4, 2)
    np_model = random_model(seed=7, vocab_size=512, dim=nh * hd, n_layers=2, n_heads=nh,
                            n_kv_heads=nkv, head_dim=hd, hidden_dim=256, rope_dim=hd,
                            max_seq_len=2048)
    return from_oracle(np_model, weights="float")


def prefilled(model, kv, n, **options):
    cache = model.make_cache(kv, **options)
    ids = [1 + i * 7 % (model.args.vocab_size - 1) for i in range(n)]
    mx.eval(model.forward(ids, cache, last_only=True), cache.state())
    return cache


def oracle_values(stored: np.ndarray, v_type: str, hd: int) -> np.ndarray:
    """The values a cache's storage holds, decoded by the oracle: float32 [n_kv, L, hd]."""
    if v_type in ("fp16", "fp32"):
        return stored.astype(np.float32)
    return tk.dequantize_v(stored, v_type, hd)


def stored_value(x: np.ndarray, v_type: str) -> np.ndarray:
    """What the oracle stores for values ``x`` (in the MLX cache's array dtype)."""
    if v_type == "fp16":
        return x.astype(np.float16)
    if v_type == "fp32":
        return x
    return tk.quantize_v(x, v_type)


@pytest.mark.parametrize("kind, path, v_type, window", CONFIGS, ids=IDS)
def test_one_layer_against_the_oracle(model, kind, path, v_type, window, ctx=300):
    """One layer of the step, every score kept (``FusedStep.attend_scores``), at a context of
    300 tokens (past one buffer step; the window's ring wrapped many times)."""
    a = model.args
    if a.head_dim != 64 and (kind, path, v_type, window) not in SOME:
        pytest.skip("hd32: a covering subset of the configurations")
    hd, nkv, G = a.head_dim, a.n_kv_heads, a.n_heads // a.n_kv_heads
    cache = prefilled(model, kind, ctx, score_path=path, v=v_type, k_window=window)
    cache.reserve(512)
    spec = fd.TurboSpec.of(cache)
    step = fd.FusedStep(model, spec)
    k, v = cache.take_buffers()
    kw = [cache.take_window()[0]] if window else []
    pos = fd.position(ctx)
    x = step.embed(mx.array([3], mx.int32), model.weights.token_embd)
    q, kv = step.norm_qkv_rope(x, model.weights.layers[0], pos, mx.float32)
    scores, parts = step.attend_scores(q, kv, k[0][0], v[0][0], pos, *kw)
    mx.eval(scores, parts, k[0][0], v[0][0], *kw)
    L = ctx + 1
    q, kv = np.array(q), np.array(kv)
    key, val = kv[:nkv * hd].reshape(nkv, hd), kv[nkv * hd:].reshape(nkv, hd)
    blocks, values = np.array(k[0][0])[:, :L], np.array(v[0][0])[:, :L]

    # this token's key block and value, written by the kernel: the oracle's bytes
    assert np.array_equal(blocks[:, ctx], tk.quantize(key, kind))
    assert np.array_equal(values[:, ctx].view(np.uint8), stored_value(val, v_type).view(np.uint8))

    # the scores from the stored blocks (window: the float keys of the newest `window` tokens)
    scale = np.float32(1 / math.sqrt(hd))
    qh = q.reshape(nkv, G, hd)
    want = tk.scores(qh, blocks, kind, hd, path).astype(np.float64) * scale  # [nkv, G, L]
    if window:
        ring = np.array(kw[0])  # [nkv, window, hd]
        recent = np.arange(max(0, L - window), L)
        exact = ring[:, recent % window]  # [nkv, n, hd]
        assert np.array_equal(exact[:, -1], key)  # this token's float key, into the ring
        want[..., recent] = np.einsum("kgd,knd->kgn", qh.astype(np.float64), exact) * scale
    got = np.array(scores)[:, :L].reshape(nkv, G, L)
    row_max = np.max(np.abs(want), axis=-1, keepdims=True)
    # float32 sums in another order than the oracle's float64: the golden vectors' 1e-5
    assert np.all(np.abs(got - want) <= 1e-5 * row_max)

    # the attention output from those scores and the stored values
    p = np.exp(want - want.max(-1, keepdims=True))
    o = np.einsum("kgn,knd->kgd", p / p.sum(-1, keepdims=True),
                  oracle_values(values, v_type, hd).astype(np.float64))
    parts = np.array(parts).reshape(nkv, G, hd + 2)
    o_got = parts[..., :hd] / parts[..., hd + 1:]
    # softmax and values in float32, online: ~1e-6 of the output's scale
    assert np.max(np.abs(o_got - o)) <= 1e-5 * max(1.0, np.max(np.abs(o)))


@pytest.mark.parametrize("kind, path, v_type, window",
                         [("turbo_kv_4b", "int8_codebook", "fp16", 0),
                          ("turbo_kv_5b", "fp32_codebook", "q4", 0),
                          ("turbo_kv_3b", "dequant", "fp32", 0),
                          ("turbo_kv_4b", "int8_codebook", "q2", 5)])
@pytest.mark.parametrize("ctx", [20, 600])
def test_decode_steps_match_the_plain_graph(model, kind, path, v_type, window, ctx):
    opts = dict(score_path=path, v=v_type, k_window=window)
    plain, fused = prefilled(model, kind, ctx, **opts), prefilled(model, kind, ctx, **opts)
    identity = lambda logits: logits  # noqa: E731 - hands the logits back
    dec = Decoder(model, fused, identity, fused=True)
    assert dec.fused
    for t in (3, 17, 5, 99, 250, 8):
        want = model.forward(mx.array([t], mx.uint32), plain, last_only=True)
        got = dec(mx.array([t], mx.uint32))
        mx.eval(want, got, plain.state(), fused.state())
        want, got = np.array(want), np.array(got)
        # Another order of float32 sums for q, k, v (matmuls vs warp sums): a key element on a
        # codebook boundary may take the neighbouring index in one path and not the other,
        # moving a score by up to a centroid gap; 1e-3 of the largest logit bounds that here,
        # and the typical difference is ~1e-6 (parity's order of rounding).
        assert np.max(np.abs(got - want)) <= 1e-3 * np.max(np.abs(want))
    assert fused.length == plain.length == ctx + 6
    # the caches hold the same number of blocks; all written
    kf, _ = fused.stored(0)
    assert np.array(kf[0]).shape[1] == ctx + 6


@pytest.mark.model
@pytest.mark.parametrize("kind", ["turbo_kv_4b", "turbo_kv_5b"])
def test_default_model_greedy_tokens_are_the_oracles(kind):
    """64 greedy tokens of the default model, fused step on the GPU against the NumPy oracle
    (``bench/greedy_divergence.py``). Tokens may part only where a float32 key that differs in
    its last bits took the other side of a centroid boundary: the first such flips (lowest
    layer: what every later difference follows from) must lie within 1e-4 of the boundary,
    relative (a key's last bits after 30 layers: ~1e-6 of its largest element, ~1e-5 of a
    small one)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from greedy_divergence import compare

    r = compare(kind, 64)
    assert r["decoder"] == "fused"
    if r["first"] is not None:
        print(f"{kind}: first divergence at step {r['first']} (margin {r['margin']:.3g}); first "
              f"flips in layer {r['first_layer']}: {r['first_distances'][:4]}")
        assert r["first_distances"] and max(d for d, _ in r["first_distances"]) <= 1e-4


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_step_with_quantized_layers_launches_and_matches_the_plain_graph(bits):
    """4- and 8-bit layers (ptxas gives the 8-bit attention kernel ~168 registers a thread at
    512 threads a block, more than an SM holds: this checks that the launch still happens)."""
    np_model = random_model(seed=3, vocab_size=512, dim=192, n_layers=2, n_heads=3,
                            n_kv_heads=1, head_dim=64, hidden_dim=256, rope_dim=64,
                            max_seq_len=1024)
    model = from_oracle(np_model, weights="quantized", bits=bits, embed_bits=8)
    plain, fused = prefilled(model, "fp16", 40), prefilled(model, "fp16", 40)
    identity = lambda logits: logits  # noqa: E731 - hands the logits back
    dec = Decoder(model, fused, identity, fused=True)
    want = model.forward(mx.array([5], mx.uint32), plain, last_only=True)
    got = dec(mx.array([5], mx.uint32))
    mx.eval(want, got)
    want, got = np.array(want), np.array(got)
    # fp16 cache, the same float32 arithmetic in another order: 4e-6 of the largest logit is
    # the fused step's documented bound against the plain graph with an fp32 cache; fp16
    # storage of this token's k, v rounds identically in both, so the bound holds here too
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
