"""Prefill attention of turbo_kv caches in one CUDA kernel (``turbo_prefill_attend.cu``), on a
CUDA GPU (the only place it runs; CPU CI skips this file; ``tools/nvrtc_check.py --only
prefill`` compiles it without a GPU).

    bash tools/gpu_run.sh tests tests/test_turbo_prefill_gpu.py     # on the GPU machine
    # or: MLX_ENABLE_TF32=0 python -m pytest -q tests/test_turbo_prefill_gpu.py

Checked against the NumPy oracle (``quantref.cache`` / ``quantref.turbo_kv``) on the same data,
for every kind, score path and value type, with and without a k-window and a sliding window,
four head sizes (a covering set, not the whole product):
- the cache's key blocks (this chunk's too, quantized before attention) and value bytes are
  the oracle's, byte for byte;
- every score the kernel computes from the stored blocks is within 1e-5 of its row's largest
  (the golden tolerance of quant.cpp's own vectors: float32 sums in another order), and the
  attention output matches within what those score differences allow;
- whole prefills of a random model give the plain graph's logits, with the same blocks.
"""

from __future__ import annotations

import itertools
import math
import zlib

import numpy as np
import pytest

from quantref import cache as oracle_cache
from quantref import turbo_kv as tk
from quantref.testing import random_model

mx = pytest.importorskip("mlx.core")
from quantref_mlx import turbo_prefill  # noqa: E402
from quantref_mlx.cache import make_cache  # noqa: E402
from quantref_mlx.fused_decode import TurboSpec  # noqa: E402
from quantref_mlx.model import from_oracle  # noqa: E402

CUDA = getattr(mx, "cuda", None) is not None and mx.cuda.is_available() \
    and mx.default_device().type == mx.DeviceType.gpu
pytestmark = pytest.mark.skipif(not CUDA, reason="the prefill kernel runs on CUDA GPUs only")

V_TYPES = ("fp16", "fp32", "q4", "q2")
# every score path x value type; kind, k-window and sliding window in rotation
COVER = [(tk.KINDS[i % 3], p, v, 5 * (i % 2), 40 * (i // 2 % 2))
         for i, (p, v) in enumerate(itertools.product(tk.PATHS, V_TYPES))]
SHAPES = {"hd64": (64, 6, 2), "hd32": (32, 4, 2), "hd128": (128, 4, 2), "hd256": (256, 2, 1)}
CASES = [(s, *c) for s in SHAPES for c in (COVER if s == "hd64" else COVER[::3])]
IDS = [f"{s}-{k[-2:]}-{p.split('_')[0]}-{v}-w{w}-sw{sw}" for s, k, p, v, w, sw in CASES]


def oracle_values(stored: np.ndarray, v_type: str, hd: int) -> np.ndarray:
    """The values a cache's storage holds, decoded by the oracle: float32 [n_kv, L, hd]."""
    if v_type in ("fp16", "fp32"):
        return stored.astype(np.float32)
    return tk.dequantize_v(stored, v_type, hd)


@pytest.mark.parametrize("shape, kind, path, v_type, window, swin", CASES, ids=IDS)
def test_chunk_against_the_oracle(shape, kind, path, v_type, window, swin, P=300, T=37):
    """A chunk of T = 37 rows after P = 300 stored tokens (past one buffer step of 256), one
    layer, through the cache's seam (``KVCache.prefill_attention``) and the kernel's scores."""
    hd, nh, nkv = SHAPES[shape]
    G, L = nh // nkv, P + T
    rng = np.random.default_rng(zlib.crc32(f"{shape}{kind}{path}{v_type}".encode()))
    k1, v1 = (rng.standard_normal((nkv, P, hd), dtype=np.float32) for _ in range(2))
    k2, v2 = (rng.standard_normal((nkv, T, hd), dtype=np.float32) for _ in range(2))
    q = rng.standard_normal((nh, T, hd), dtype=np.float32) * np.float32(2)  # peakier softmax
    opts = dict(v=v_type, k_window=window, score_path=path)
    mc = make_cache(kind, n_layers=1, n_kv_heads=nkv, head_dim=hd, **opts)
    oc = oracle_cache.make_cache(kind, n_layers=1, n_kv_heads=nkv, head_dim=hd, **opts)
    mc.append(0, mx.array(k1), mx.array(v1))
    mc.commit(P)
    oc.append(0, k1, v1)
    oc.commit(P)
    mc.append(0, mx.array(k2), mx.array(v2))
    oc.append(0, k2, v2)

    scale = 1 / math.sqrt(hd)
    spec = TurboSpec.of(mc)
    (kbuf,), (vbuf,) = mc._k[0].arrays, mc._v[0].arrays
    kw = mc._k_exact[0] if window else None
    out, scores = turbo_prefill.attend(mx.array(q), kbuf, vbuf, P, spec, scale, kw, swin,
                                       scores=True)
    seam = mc.prefill_attention(0, mx.array(q), scale, swin)
    assert seam is not None
    mx.eval(out, scores, seam, kbuf, vbuf)
    out, seam = np.array(out), np.array(seam)
    assert np.array_equal(out, seam)  # the same kernel, the same inputs: the same bits

    # the stored blocks (this chunk's, quantized by turbo_kv_quantize.cu) and values: the
    # oracle's bytes
    (ok,), (ov,) = oc.stored(0)
    assert np.array_equal(np.array(kbuf)[:, :L], ok)
    assert np.array_equal(np.array(vbuf)[:, :L].view(np.uint8), ov.view(np.uint8))

    # the oracle's scores: the blocks (the k-window's float keys where a row's window holds
    # them), scaled, causal, the sliding window
    want = oc.scores(0, q.reshape(nkv, G, T, hd)).astype(np.float64) * scale  # [nkv, G, T, L]
    pos_q = P + np.arange(T)[:, None]
    t = np.arange(L)[None, :]
    visible = (t <= pos_q) & ((t > pos_q - swin) if swin else True)  # [T, L]
    got = np.array(scores)[:, :, :L].reshape(nkv, G, T, L)
    row_max = np.max(np.where(visible, np.abs(want), 0), axis=-1, keepdims=True)
    # float32 sums in another order than the oracle's: the golden vectors' 1e-5
    assert np.all(np.abs(np.where(visible, got - want, 0)) <= 1e-5 * row_max)

    # the attention output from those scores and the stored values
    s = np.where(visible, want, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    vals = oracle_values(ov, v_type, hd).astype(np.float64)  # [nkv, L, hd]
    o = np.einsum("kgtl,kld->kgtd", p / p.sum(-1, keepdims=True), vals)
    o_got = out.reshape(T, nkv, G, hd).transpose(1, 2, 0, 3)
    # A score error e moves the softmax by at most 2e in l1, so the output by 2e * max|v|;
    # e <= 1e-5 * the row's largest score (asserted above); plus the float32 rounding of the
    # online softmax and the value sums (~1e-6 * max|v|).
    tol = (2e-5 * row_max + 1e-6) * np.max(np.abs(vals))
    assert np.all(np.abs(o_got - o) <= tol)


@pytest.fixture(scope="module")
def model():
    """Random float weights, head_dim 64 and three query heads per KV head, as SmolLM2."""
    np_model = random_model(seed=7, vocab_size=512, dim=384, n_layers=2, n_heads=6,
                            n_kv_heads=2, head_dim=64, hidden_dim=256, rope_dim=64,
                            max_seq_len=2048)
    return from_oracle(np_model, weights="float")


@pytest.mark.parametrize("kind, path, v_type, window",
                         [("turbo_kv_4b", "int8_codebook", "fp16", 0),
                          ("turbo_kv_5b", "fp32_codebook", "q4", 0),
                          ("turbo_kv_3b", "dequant", "fp32", 0),
                          ("turbo_kv_4b", "int8_codebook", "q2", 5)])
def test_prefill_matches_the_plain_graph(model, kind, path, v_type, window, monkeypatch):
    """300 tokens in chunks of 128, 128 and 44: the kernel's logits against the plain graph's
    (``turbo_prefill.USE = False``), every row, and the same layer-0 blocks."""
    opts = dict(score_path=path, v=v_type, k_window=window)
    ids = [1 + i * 7 % (model.args.vocab_size - 1) for i in range(300)]

    def prefill(use):
        monkeypatch.setattr(turbo_prefill, "USE", use)
        cache = model.make_cache(kind, **opts)
        rows = []
        for s in range(0, len(ids), 128):
            logits = model.forward(ids[s:s + 128], cache)
            mx.eval(logits, cache.state())
            rows.append(np.array(logits))
        return np.concatenate(rows), cache

    got, kernel_cache = prefill(None)
    want, plain_cache = prefill(False)
    assert kernel_cache.length == plain_cache.length == 300
    # layer 0's keys come from the embeddings alone: the same blocks, byte for byte
    (kk,), (kv,) = kernel_cache.stored(0)
    (pk,), (pv,) = plain_cache.stored(0)
    assert np.array_equal(np.array(kk), np.array(pk))
    assert np.array_equal(np.array(kv).view(np.uint8), np.array(pv).view(np.uint8))
    # Layer 1's keys come from attention outputs that differ in their last bits (an online
    # softmax in float32 against MLX's softmax and matmuls): a key element on a codebook
    # boundary may take the neighbouring index in one cache and not the other, moving a score
    # by up to a centroid gap. 1e-3 of the largest logit bounds that here (as the fused
    # decode step's test), and the typical difference is ~1e-6.
    assert np.max(np.abs(got - want)) <= 1e-3 * np.max(np.abs(want))


def test_decode_rows_keep_their_path(model):
    """One row (decode) and non-turbo caches never take the kernel."""
    cache = model.make_cache("turbo_kv_4b")
    mx.eval(model.forward([1, 2, 3], cache), cache.state())
    q = mx.zeros((model.args.n_heads, 1, model.args.head_dim), mx.float32)
    k = mx.zeros((model.args.n_kv_heads, 1, model.args.head_dim), mx.float32)
    cache.append(0, k, k)
    assert cache.prefill_attention(0, q, 0.125) is None
    fp16 = model.make_cache("fp16")
    k2 = mx.zeros((model.args.n_kv_heads, 2, model.args.head_dim), mx.float32)
    fp16.append(0, k2, k2)
    q2 = mx.zeros((model.args.n_heads, 2, model.args.head_dim), mx.float32)
    assert fp16.prefill_attention(0, q2, 0.125) is None
