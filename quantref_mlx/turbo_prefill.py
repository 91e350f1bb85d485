"""Prefill attention of a turbo_kv cache in one CUDA kernel per layer, reading the key blocks.

A chunk of ``T > 1`` tokens (prefill, perplexity windows) attends, in the plain graph
(:meth:`quantref_mlx.model.Model.attention`), through the cache's codec: scores from the stored
blocks (the compiled codebook function, or the keys dequantized), the mask, a softmax and the
decoded values, as many MLX operations over a ``[n_heads, T, L]`` score array. On CUDA this
module replaces all of that with ``turbo_prefill_attend.cu`` (see the comment that opens it):
one block per (KV head, tile of rows) decodes each key block once for the tile's rows times the
heads of that KV head, with the score path, value storage and k-window of the cache, an online
softmax per query, and writes the attention output ``[T, n_heads * head_dim]``. The chunk's
keys are quantized before (by :func:`quantize`, ``turbo_prefill_quantize.cu``: a warp per
128-element chunk, the bytes of ``turbo_kv_quantize.cu``; one launch per layer, in
:meth:`quantref_mlx.cache.KVCache.append`), so a row scores its own chunk's keys compressed,
as the oracle does.

Used by :meth:`quantref_mlx.cache.KVCache.prefill_attention` when :func:`available` (CUDA) and
:func:`why_not` is None; decode steps (``T == 1``) keep their own paths. ``USE`` switches it:
None (default) on CUDA only, False never (the plain graph: ``bench/decode_speed.py``'s
comparison rows), True always, which ``tools/nvrtc_check.py`` sets to record its launches on
the CPU (there ``mx.fast.cuda_kernel`` is a recorder that returns zeros).

Exactness: scores are float32 sums in another order than the oracle's float64 matmul (within
1e-5 of a row's largest score, ``tests/test_turbo_prefill_gpu.py``), never TF32 (the plain
graph's matmuls are, on CUDA, unless ``MLX_ENABLE_TF32=0``).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import mlx.core as mx
import numpy as np

from . import kernels
from .fused_decode import TurboSpec

__all__ = ["MAX_WARPS", "NW", "PER_WARP", "QUANTIZE", "QUERIES", "ROWS", "USE", "attend",
           "available", "quantize", "why_not"]

USE: bool | None = None  # None: on CUDA; False: never; True: always (nvrtc_check's recording)
# A block's shape (turbo_prefill_attend.cu's TQ rows and NW warps; its queries are the rows times
# the heads of one KV head, PER_WARP a warp): at least QUERIES queries, so that each key tile a
# block decodes serves that many; and, where the device's SM count is known, enough rows that
# the grid is at most one block an SM (one round: 156 blocks on 132 SMs had taken two, or shared
# an SM, the slowest block setting the time). Measured on the H200, chunks of 512
# (bench/prefill_speed.py, docs/benchmarks.md section 3).
QUERIES = 30
PER_WARP = 2  # queries a warp: 2 accumulators of head_dim / 32 floats each
# Warps a block at most: 20 (640 threads: at most 96 registers each, allocated 8 at a time) up
# to head_dim 64, whose kernels take 47-80 (tools/nvrtc_check.py --resources); 16 (512 threads,
# 128 registers) above.
MAX_WARPS = {True: 20, False: 16}
ROWS: int | None = None  # rows a block, forced (tuning, tests); None: _shape decides
NW: int | None = None    # warps a block, forced; None: _shape decides
WARP = 32
SMEM = 46 * 1024  # static shared memory a block may take (48 KiB, some left for the compiler)
# A chunk's keys quantized a warp per 128-element chunk (turbo_prefill_quantize.cu) instead of
# a thread per chunk (turbo_kv_quantize.cu): the same bytes; False: the thread per chunk.
QUANTIZE = True


def _smem(rows: int, g: int, hd: int, nlev: int, qwin: bool, nw: int) -> int:
    """Bytes of static shared memory of a block of ``rows`` rows and ``nw`` warps (the
    kernel's arrays; VS, its tile of values, at head_dim 64 or less)."""
    nq = rows * g
    qw = -(-nq // nw)
    return 4 * (nq * hd * (2 if qwin else 1) + (4 if not qwin else 0) + hd * (WARP + 1)
                + nw * qw * WARP + nlev + (WARP * hd if hd <= 64 else 4))


@lru_cache(maxsize=None)
def _sm_count() -> int | None:
    from .persistent_decode import sm_count

    return sm_count()


def _block(rows: int, g: int, hd: int, spec: TurboSpec) -> tuple[int, int]:
    """(warps, bytes of static shared memory) of a block of ``rows`` rows of ``g`` query heads
    (``PER_WARP`` queries a warp, at most ``MAX_WARPS``; ``NW`` forces the warps)."""
    nw = NW or min(MAX_WARPS[hd <= 64], -(-rows * g // PER_WARP))
    qwin = bool(spec.window) and spec.path != "dequant"
    return nw, _smem(rows, g, hd, dict(spec.template(hd))["NLEV"], qwin, nw)


def _shape(T: int, nkv: int, g: int, hd: int, spec: TurboSpec) -> tuple[int, int]:
    """(rows, warps) of a block for a chunk of ``T`` rows and ``nkv`` KV heads of ``g`` query
    heads each (``QUERIES``, ``PER_WARP``), within ``MAX_WARPS`` and ``SMEM``; ``ROWS`` and
    ``NW`` force them."""
    if ROWS:
        rows = ROWS
    else:
        rows = -(-QUERIES // g)
        sms = _sm_count()
        if sms:  # one block an SM at most, for T rounded up to a power of two: few kernels
            rows = max(rows, -(-nkv * (1 << (T - 1).bit_length()) // sms))
        # (not capped by T: a block's rows past T are copies, never written out)
        rows = max(1, min(rows, MAX_WARPS[hd <= 64] * PER_WARP // g))
    while rows > 1 and _block(rows, g, hd, spec)[1] > SMEM:
        rows -= 1
    return rows, _block(rows, g, hd, spec)[0]


def available() -> bool:
    """Whether prefill attention takes the kernel here (see ``USE``)."""
    if USE is not None:
        return USE
    cuda = getattr(mx, "cuda", None)
    return (mx.default_device().type == mx.DeviceType.gpu and cuda is not None
            and cuda.is_available())


def why_not(spec: TurboSpec | None, n_heads: int, n_kv_heads: int, head_dim: int) -> str | None:
    """None when the kernel covers this cache and these shapes; else why not."""
    if spec is None:
        return "not a turbo_kv cache"
    if spec.v_type not in TurboSpec.V_TYPES:
        return f"turbo_kv values {spec.v_type!r}"
    # whole 128-element chunks, or one power-of-two chunk (the butterfly needs no pass-through);
    # a lane's DPL = head_dim / 32 indices fit one 64-bit word up to 8 (7 + 5 * 8 bits)
    if not (head_dim % 128 == 0 or head_dim & (head_dim - 1) == 0) or head_dim % WARP \
            or head_dim > 256:
        return f"head_dim {head_dim} (32, 64, 128 or 256 only)"
    if n_heads % n_kv_heads:
        return "query heads not a multiple of KV heads"
    g = n_heads // n_kv_heads
    if _block(1, g, head_dim, spec)[1] > SMEM:  # even a block of one row
        return f"{g} query heads a KV head of head_dim {head_dim}: a block's shared memory"
    return None


@lru_cache(maxsize=None)
def _kernel(spec: TurboSpec, scale: float, scores: bool = False):
    """The kernel for ``spec`` with the attention scale compiled in (an exact float32 literal);
    ``scores``: also the scores output (``TP_SCORES``, for tests). The name carries a hash of
    the source: MLX caches compiled kernels by name."""
    header = f"#define TP_SCALE {float(np.float32(scale)).hex()}f\n"
    if scores:
        header += "#define TP_SCORES 1\n"
    header += spec.header()
    source = kernels.source("turbo_prefill_attend.cu")
    digest = hashlib.sha256((header + source).encode()).hexdigest()[:12]
    inputs = ["q", "kc", "vc"] + (["kw"] if spec.window else []) + ["pos"]
    outputs = ["out"] + (["scores"] if scores else [])
    return mx.fast.cuda_kernel(name=f"turbo_prefill_attend_{digest}", input_names=inputs,
                               output_names=outputs, source=source, header=header)


def attend(q: mx.array, kbuf: mx.array, vbuf: mx.array, offset: int, spec: TurboSpec,
           scale: float, kw: mx.array | None = None, sliding_window: int = 0, *,
           scores: bool = False) -> mx.array | tuple[mx.array, mx.array]:
    """The chunk's attention output: ``q float32 [n_heads, T, head_dim]`` (after RoPE) at
    positions ``offset .. offset + T - 1`` against the stored keys ``kbuf uint8 [n_kv_heads,
    capacity, n_chunks, block_bytes]`` and values ``vbuf`` (``[n_kv_heads, capacity, head_dim]``
    float32 / float16, or ``uint8 [n_kv_heads, capacity, v_bytes]`` for q4 / q2), positions
    ``0 .. offset + T - 1`` filled (this chunk's too) -> ``float32 [T, n_heads * head_dim]``.

    ``kw float32 [n_kv_heads, NX, head_dim]``: with a k-window (``spec.window``), the float
    keys of positions ``offset + T - NX .. offset + T - 1`` (at least the window of every row:
    ``NX >= min(window, offset) + T``). ``sliding_window``: a sliding-window layer's width (0:
    none). ``scale`` multiplies the scores (``1/sqrt(head_dim)``, or 1). ``scores=True`` also
    returns ``float32 [n_heads, T, capacity]`` (each score times ``scale``; 0 where a row sees
    no key). Raises ``ValueError`` for shapes the kernel does not cover."""
    nh, T, hd = q.shape
    nkv, cap = kbuf.shape[0], kbuf.shape[1]
    why = why_not(spec, nh, nkv, hd)
    if why:
        raise ValueError(f"turbo_prefill_attend: {why}")
    if offset + T > cap or vbuf.shape[:2] != (nkv, cap):
        raise ValueError(f"buffers of {cap} tokens (K) / {vbuf.shape[1]} (V) for positions up "
                         f"to {offset + T}")
    nx = 0
    if spec.window:
        if kw is None or kw.shape[0] != nkv or kw.shape[2] != hd:
            raise ValueError("a k-window needs its float keys kw [n_kv_heads, NX, head_dim]")
        nx = kw.shape[1]
        if nx < min(spec.window, offset) + T:
            raise ValueError(f"kw holds {nx} keys; the chunk's rows need "
                             f"{min(spec.window, offset) + T}")
    # four elements, not one: see quantref_mlx.fused_decode._kernel on small arrays
    pos = mx.array(np.array([offset, nx, 0, 0], np.int32))
    inputs = [q.astype(mx.float32), kbuf, vbuf] \
        + ([kw.astype(mx.float32)] if spec.window else []) + [pos]
    rows, nw = _shape(T, nkv, nh // nkv, hd, spec)
    template = [("NH", nh), ("NKV", nkv), ("HD", hd), ("DPL", hd // WARP), ("NW", nw),
                ("TQ", rows)] + spec.template(hd) + [("SWIN", int(sliding_window))]
    outs = _kernel(spec, float(scale), scores)(
        inputs=inputs, template=template,
        output_shapes=[(T, nh * hd)] + ([(nh, T, cap)] if scores else []),
        output_dtypes=[mx.float32] * (2 if scores else 1),
        grid=(nkv * -(-T // rows) * nw * WARP, 1, 1), threadgroup=(nw * WARP, 1, 1),
        **({"init_value": 0.0} if scores else {}))
    return (outs[0], outs[1]) if scores else outs[0]


@lru_cache(maxsize=None)
def _quantize_kernel(kind: str):
    header = TurboSpec(kind, "fp32_codebook", "fp16", 0).header()
    source = kernels.source("turbo_prefill_quantize.cu")
    digest = hashlib.sha256((header + source).encode()).hexdigest()[:12]
    return mx.fast.cuda_kernel(name=f"turbo_prefill_quantize_{digest}", input_names=["x"],
                               output_names=["out"], source=source, header=header)


def quantize(x: mx.array, kind: str) -> mx.array | None:
    """A chunk's keys ``float32 [n_kv_heads, T, head_dim]`` (``T > 1``) -> turbo_kv blocks
    ``uint8 [n_kv_heads, T, n_chunks, block_bytes]``, the bytes of
    :func:`quantref_mlx.turbo_kv.quantize`, a warp per chunk (``turbo_prefill_quantize.cu``);
    None where that function should run instead: not on CUDA (:func:`available`), ``QUANTIZE``
    off, one row (decode), or a head size the kernel does not cover (``why_not``'s)."""
    from . import turbo_kv as tk

    if not QUANTIZE or not available() or x.ndim != 3 or x.shape[1] < 2:
        return None
    nkv, T, hd = x.shape
    if not (hd % 128 == 0 or hd & (hd - 1) == 0) or hd % WARP:
        return None
    cd = min(hd, tk.BLOCK)
    nc, bb = hd // cd, tk.block_bytes(kind)
    rows = nkv * T
    (out,) = _quantize_kernel(kind)(
        inputs=[x.astype(mx.float32).reshape(rows, hd)],
        template=[("D", hd), ("BB", bb), ("KBITS", tk.bits(kind)), ("NLEV", 1 << tk.bits(kind))],
        output_shapes=[(rows, nc, bb)], output_dtypes=[mx.uint8],
        grid=(-(-rows * nc // 4) * 4 * WARP, 1, 1), threadgroup=(4 * WARP, 1, 1))
    return out.reshape(nkv, T, nc, bb)
