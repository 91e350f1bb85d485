"""Prefill attention of turbo_kv caches in one CUDA kernel (``turbo_prefill_attend.cu``), on a
CUDA GPU (the only place it runs; CPU CI skips this file; ``tools/nvrtc_check.py --only
prefill`` compiles it without a GPU).

    bash tools/gpu_run.sh tests tests/test_turbo_prefill_gpu.py     # on the GPU machine
    # or: MLX_ENABLE_TF32=0 python -m pytest -q tests/test_turbo_prefill_gpu.py

Checked against the NumPy oracle (``quantref.cache`` / ``quantref.turbo_kv``) on the same data,
for every kind, score path and value type, with and without a k-window and a sliding window,
four head sizes (a covering set, not the whole product):
- the cache's key blocks (this chunk's too, quantized before attention, a warp per chunk by
  ``turbo_prefill.quantize``) and value bytes are the oracle's, byte for byte;
- every score the kernel computes from the stored blocks is within 1e-5 of its row's largest
  (the golden tolerance of quant.cpp's own vectors: float32 sums in another order), and the
  attention output matches within what those score differences allow;
- in whole prefills of a random model, every layer's kernel output is the plain graph's on the
  same cache, and the logits are the plain prefill's (up to codebook flips of layer-1 keys).
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
from quantref_mlx.cache import KVCache, make_cache  # noqa: E402
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
    """300 tokens in chunks of 128, 128 and 44 (2 layers), the kernel against the plain graph
    (``turbo_prefill.USE = False``):
    1. every layer and chunk of the kernel's prefill: the kernel's attention output against the
       plain graph's on the SAME cache (the same stored blocks and values, the same queries);
    2. the whole prefill against a plain one: the same layer-0 blocks; layer-1 blocks that
       differ only where a key element sits on a codebook boundary; the logits."""
    opts = dict(score_path=path, v=v_type, k_window=window)
    ids = [1 + i * 7 % (model.args.vocab_size - 1) for i in range(300)]
    a = model.args
    checks = []
    seam = KVCache.prefill_attention

    def checked(self, layer, q, scale, sliding_window=0):
        """The seam, and the plain graph's attention on the same cache state beside it."""
        out = seam(self, layer, q, scale, sliding_window)
        if out is not None:
            nh, T, hd = q.shape
            nkv = self.n_kv_heads
            s = self.scores(layer, q.reshape(nkv, nh // nkv, T, hd)) * scale + self.mask(T)
            vals = self.values(layer)  # [nkv, L, hd]
            probs = mx.softmax(s, axis=-1, precise=True).reshape(nkv, -1, s.shape[-1])
            plain = (probs @ vals).reshape(nh, T, hd).transpose(1, 0, 2).reshape(T, -1)
            checks.append((layer, out, plain, s, vals))
        return out

    def prefill(use):
        monkeypatch.setattr(turbo_prefill, "USE", use)
        cache = model.make_cache(kind, **opts)
        rows = []
        for s in range(0, len(ids), 128):
            logits = model.forward(ids[s:s + 128], cache)
            mx.eval(logits, cache.state(), [c[1:] for c in checks])
            rows.append(np.array(logits))
        return np.concatenate(rows), cache

    monkeypatch.setattr(KVCache, "prefill_attention", checked)
    got, kernel_cache = prefill(None)
    monkeypatch.setattr(KVCache, "prefill_attention", seam)
    assert len(checks) == 3 * a.n_layers  # every chunk, every layer took the kernel
    for layer, out, plain, s, vals in checks:
        s = np.array(s)  # [nkv, G, T, L], -inf where masked
        T = s.shape[2]
        row_max = np.max(np.where(np.isfinite(s), np.abs(s), 0), axis=3)  # [nkv, G, T]
        row_max = np.repeat(row_max.reshape(-1, T).T, a.head_dim, axis=1)  # as out [T, nh*hd]
        # Each side's scores are within 1e-5 of a row's largest score of the exact ones
        # (test_chunk_against_the_oracle for the kernel; float32 matmuls, MLX_ENABLE_TF32=0,
        # for the graph), so 2e-5 apart; a score difference e moves the output by at most
        # 2e * max|v|; plus both sides' float32 rounding of the softmax and value sums.
        tol = (4e-5 * row_max + 2e-6) * np.max(np.abs(np.array(vals)))
        assert np.all(np.abs(np.array(out) - np.array(plain)) <= tol), (layer, T)

    want, plain_cache = prefill(False)
    assert kernel_cache.length == plain_cache.length == 300
    # layer 0's keys come from the embeddings alone: the same blocks, byte for byte
    (kk,), (kv,) = kernel_cache.stored(0)
    (pk,), (pv,) = plain_cache.stored(0)
    assert np.array_equal(np.array(kk), np.array(pk))
    assert np.array_equal(np.array(kv).view(np.uint8), np.array(pv).view(np.uint8))
    # Layer 1's keys and values come from layer 0's attention outputs, which differ in their
    # last bits (checked tightly above): a key element on a codebook boundary may take the
    # neighbouring index in one cache and not the other (a flip; or a last-bit change of a
    # block's fp16 norm or scale: ~1e-3 of blocks for a 1e-6 relative change), a value its
    # neighbouring fp16 (or q4 / q2 code). A real error would change most key blocks; flips
    # change a few (0.2% of blocks expected: 64 elements x ~1e-5 + the header's ~1e-3).
    (k1,), (v1,) = kernel_cache.stored(1)
    (pk1,), (pv1,) = plain_cache.stored(1)
    k_differs = np.any(np.array(k1) != np.array(pk1), axis=(2, 3))  # [nkv, 300]
    v_differs = np.any(np.array(v1).view(np.uint8) != np.array(pv1).view(np.uint8),
                       axis=2)  # [nkv, 300]
    assert k_differs.mean() <= 0.02, k_differs.sum()
    # Logits: a row's layer-1 attention reads keys and values 0 .. its own position, so rows
    # before the first differing key or value see the same layer-1 cache in both runs and differ
    # by float32 rounding alone (~1e-6 of the largest logit measured; 1e-4 leaves room for the
    # 2 layers' amplification). Rows from there on may differ by what flips do: one flip moves
    # one element of one key by a centroid gap (<= 2 CENT_MAX / 2^bits of the rotated unit key,
    # times its norm), so one score by up to |qr_i| * gap * norm * scale, and the logits through
    # the softmax, the output projection and the last FFN; measured: 3.8e-3 of the largest logit
    # (turbo_kv_4b, int8_codebook, fp16, the old kernel). 3e-2 bounds a few flips and still fails
    # on a wrong kernel (which moves logits by their own size; the per-layer check above is the
    # tight one).
    differs = (k_differs | v_differs).any(axis=0)  # [300]
    first = int(np.argmax(differs)) if differs.any() else len(ids)
    scale = np.max(np.abs(want))
    assert np.max(np.abs(got[:first] - want[:first]), initial=0) <= 1e-4 * scale, first
    assert np.max(np.abs(got - want)) <= 3e-2 * scale, first


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
