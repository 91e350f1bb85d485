"""A decode step in few, fused kernels: the same graph as :meth:`Model.forward` for one token,
written as three custom CUDA kernels per layer instead of ~17 MLX operations.

Why: a decode step of a model this small is bound by how many kernels it launches, not by the
bytes it reads (``docs/benchmarks.md``: ~520 kernels per token for the plain graph, and MLX's
CUDA backend spends ~4 us on each kernel of a dependent chain however little it does). Per
layer this step runs

1. ``norm_qkv_rope``: RMSNorm, the fused Q|K|V matrix-vector product and RoPE, giving q
   (float32) and this token's k, v (in the cache's dtype);
2. ``attend_project``: per query head, the query against every cached key and this token's,
   softmax and values, online (one pass, any context length), then that head's share of the
   output projection; the last block to finish sums the heads' shares (in head order) with
   the residual. Grouped-query heads read their shared KV head. It also writes this token's k
   and v into the cache's buffers, in place (the decoder owns them). Past 256 tokens of
   capacity a head's keys are split among several blocks (``attend_split``), merged and
   projected by ``attend_merge_project``: one more kernel;
3. ``ffn``: RMSNorm, the fused gate|up product and SwiGLU for a slice of the hidden units per
   block, then that slice's share of the down projection, summed as in 2 with the residual,

then the final RMSNorm with the logits (``norm_matvec``) and the sampler: ~95 kernels a token
at context 128 (30 more past 256 tokens, with the merges), against ~520 for the plain graph.
One evaluation per token, as everywhere. A product split among blocks is summed by the block
that finishes last, in a fixed order, never by atomic adds: the step is deterministic.

Weights: float (float32 or float16), or quantized as MLX keeps a GGUF's Q4_0 / Q4_1 / Q8_0
tensors (4 or 8 bits, groups of 32, float32 scales and biases): the kernels read the packed
codes and dequantize each weight in registers to exactly the oracle's float32 value, so a
quantized model streams ~5-6x fewer bytes a token (the embedding row is one more kernel).

Scope: CUDA only (these are ``mx.fast.cuda_kernel`` sources, one file each in
``quantref_mlx/kernels/``; on Metal and the CPU the plain graph runs), fp32 / fp16 caches
without a k-window, and turbo_kv caches (any kind, score path, value type, k-window; head_dim a
power of two or a multiple of 128): their attention is ``turbo_attend.cu``, which quantizes
this token's key in the kernel (the oracle's bytes) and reads the packed blocks directly.
:func:`supported` says whether a model and cache qualify; :class:`quantref_mlx.generate.Decoder`
uses this step where they do. The arithmetic is the plain graph's, in float32, in another
order (a warp's partial sums, RMSNorm's factor applied after the dot product, an online
softmax): ``bench/fused_decode_check.py`` compares the logits with the NumPy oracle's on the GPU
(within 4e-6 of the largest logit with an fp32 cache, as close as the plain graph).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from quantref import turbo_kv as tk

from . import kernels

if TYPE_CHECKING:
    from .cache import KVCache
    from .model import Linear, Model

__all__ = ["FusedStep", "TurboSpec", "launchable", "position", "supported"]

WARP = 32
ATTEND_WARPS = 16  # warps per query head in ``attend``: keys are split among them
ATTEND_UNROLL = 4  # keys a warp loads at once
ATTEND_SPLIT_KEYS = 256  # cache capacity per attention block of a head ...
ATTEND_MAX_SPLITS = 16  # ... up to this many blocks per head
ROWS_THREADS = 128  # threads per block in the matrix-vector kernels (one warp per output unit)
FFN_UNITS = 32  # hidden units per block of ``ffn`` (a whole group of the down projection's)
FFN_WARPS = 16  # warps per block of ``ffn``

# The kernels' sources are files, one per kernel (quantref_mlx/kernels/*.cu: each opens with
# what it computes, its grid and block, and its inputs and outputs); fused_common.cuh holds the
# helpers they share. name: (file, #defines, inputs, outputs). "w" and "w2" stand for a weight's
# arrays: w alone for a float weight; w, scales, biases (w2, scales2, biases2) for a quantized
# one. "kw" (the k-window's float keys) is an input only when the cache has a k-window.
_KERNELS = {
    "embed": ("embed.cu", "", ["token", "w"], ["out"]),
    "norm_matvec": ("norm_matvec.cu", "", ["x", "nw", "w"], ["out"]),
    "norm_qkv_rope": ("norm_qkv_rope.cu", "", ["x", "nw", "w", "pos", "inv_freq"], ["q", "kv"]),
    "attend_project": ("attend.cu", "#define FD_SPLIT 0\n",
                       ["q", "kv", "kc", "vc", "pos", "w", "r", "part"], ["out"]),
    "attend_split": ("attend.cu", "#define FD_SPLIT 1\n", ["q", "kv", "kc", "vc", "pos"], ["out"]),
    "attend_merge_project": ("attend_merge_project.cu", "", ["splits", "w", "r", "part"], ["out"]),
    "turbo_attend_project": ("turbo_attend.cu", "#define FD_SPLIT 0\n",
                             ["q", "kv", "kc", "vc", "kw", "pos", "w", "r", "part"], ["out"]),
    "turbo_attend_split": ("turbo_attend.cu", "#define FD_SPLIT 1\n",
                           ["q", "kv", "kc", "vc", "kw", "pos"], ["out"]),
    "turbo_attend_scores": ("turbo_attend.cu", "#define FD_SPLIT 1\n#define FD_SCORES 1\n",
                            ["q", "kv", "kc", "vc", "kw", "pos"], ["out", "scores"]),
    "ffn": ("ffn.cu", "", ["x", "nw", "w", "w2", "part"], ["out"]),
}


@lru_cache(maxsize=None)
def _kernel(which: str, eps: float, scale: float, quantized: tuple[bool, ...] = (),
            turbo: "TurboSpec | None" = None):
    """The kernel ``which``, with RMSNorm's epsilon and the attention scale compiled in, for
    float or quantized weights: ``quantized[0]`` (``[1]``) says whether the inputs ``scales``
    and ``biases`` (``scales2``, ``biases2``) follow ``w`` (``w2``); ``turbo``: the turbo_kv
    cache's constants (its kind's tables, whether it has a k-window), for ``turbo_attend_*``.

    Constants, not inputs: MLX on CUDA keeps arrays under 8 bytes in one small pool of managed
    memory, which the host touches on every token (it reads the sampled id back), so a kernel
    that reads a scalar input waits for that memory to migrate back to the GPU: ~20 us, more
    than the kernel itself (measured with ncu). For the same reason the position is a 4-element
    array (:class:`FusedStep`).
    """
    file, defines, inputs, outputs = _KERNELS[which]
    quantized = dict(zip(("w", "w2"), quantized))
    if turbo is None or not turbo.window:
        inputs = [n for n in inputs if n != "kw"]
    inputs = [n for name in inputs for n in (
        [name, "scales" + name[1:], "biases" + name[1:]] if quantized.get(name) else [name])]
    header = _constants(eps, scale, quantized.get("w", False), quantized.get("w2", False))
    header += defines + kernels.source("fused_common.cuh")
    if turbo is not None:
        header += turbo.header()
        if file == "turbo_attend.cu":
            header += kernels.source("turbo_attend.cuh")
    source = kernels.source(file)
    digest = hashlib.sha256((header + source).encode()).hexdigest()[:12]
    return mx.fast.cuda_kernel(name=f"fused_{which}_{digest}", input_names=inputs,
                               output_names=outputs, source=source, header=header)


def _constants(eps: float, scale: float, quantized: bool, quantized2: bool = False) -> str:
    """``#define`` lines for the kernels' constants (exact hexadecimal float32 literals) and
    for the weights' scales and biases, ``FD_QUANT`` for ``w`` and ``FD_QUANT2`` for ``w2``
    (null pointers for a float weight, which has none)."""
    none = "((const float*)nullptr), ((const float*)nullptr)"
    return (f"#define FD_EPS {float(np.float32(eps)).hex()}f\n"
            f"#define FD_SCALE {float(np.float32(scale)).hex()}f\n"
            f"#define FD_QUANT {'scales, biases' if quantized else none}\n"
            f"#define FD_QUANT2 {'scales2, biases2' if quantized2 else none}\n")


def _rows_launch(units: int) -> dict:
    return {"grid": (units * WARP, 1, 1), "threadgroup": (ROWS_THREADS, 1, 1)}


@dataclass(frozen=True)
class TurboSpec:
    """A turbo_kv cache as ``turbo_attend.cu`` takes it: the key kind, the score path, the value
    storage and the k-window (0: none). Hashable: a compiled kernel is kept per spec."""

    kind: str
    path: str
    v_type: str  # fp32 | fp16 | q4 | q2
    window: int

    PATHS = ("int8_codebook", "fp32_codebook", "dequant")  # PATH 0, 1, 2 in the kernel
    V_TYPES = ("fp32", "fp16", "q4", "q2")  # VT 0 .. 3

    @classmethod
    def of(cls, cache: "KVCache") -> "TurboSpec | None":
        """The spec of ``cache``, or None when its keys are not turbo_kv blocks."""
        kc, vc = cache.k_codec, cache.v_codec
        if getattr(kc, "kind", None) not in tk.KINDS:
            return None
        return cls(kc.kind, kc.score_path, vc.name, cache.k_window)

    def header(self) -> str:
        """The kind's constants for ``turbo_attend.cu``: exact float32 literals and tables, then
        the helpers both turbo_kv attention kernels read keys with."""
        def floats(values) -> str:
            return ", ".join(f"{float(v).hex()}f" for v in np.asarray(values, np.float32))

        cent = tk.CENTROIDS[self.kind]
        tab = tk.INT8_TABLES[self.kind].astype(np.float32) if self.path == "int8_codebook" \
            else cent
        return (f"#define TK_CMAX {float(np.float32(tk.CENT_MAX[self.kind])).hex()}f\n"
                f"#define TK_R {float(np.float32(tk.INT8_RECIP[self.kind])).hex()}f\n"
                f"#define TK_KW {'kw' if self.window else '((const float*)nullptr)'}\n"
                f"__constant__ float tk_cent[{cent.size}] = {{{floats(cent)}}};\n"
                f"__constant__ float tk_tab[{cent.size}] = {{{floats(tab)}}};\n"
                f"__constant__ float tk_q2[4] = {{{floats(tk.Q2_LEVELS)}}};\n"
                + kernels.source("turbo_kv_common.cuh") + kernels.source("turbo_key.cuh"))

    def template(self, head_dim: int) -> list[tuple[str, int]]:
        nc = -(-head_dim // tk.BLOCK)
        vb = tk.v_bytes(self.v_type, head_dim) if self.v_type in ("q4", "q2") else 0
        return [("KBITS", tk.bits(self.kind)), ("BB", tk.block_bytes(self.kind)), ("NC", nc),
                ("NLEV", 1 << tk.bits(self.kind)), ("PATH", self.PATHS.index(self.path)),
                ("VT", self.V_TYPES.index(self.v_type)), ("VB", vb), ("W", self.window)]


def _cache_supported(cache: "KVCache", head_dim: int) -> str | None:
    """None when the fused step's attention reads ``cache``; else why not."""
    turbo = TurboSpec.of(cache)
    if turbo is None:
        if not (cache.k_codec.plain and cache.v_codec.plain) or cache.k_window:
            return (f"cache {cache.kind} (fp32 / fp16 without a k-window, or turbo_kv, "
                    f"only)")
        return None
    if turbo.v_type not in TurboSpec.V_TYPES:
        return f"turbo_kv values {turbo.v_type!r}"
    # every 128-element chunk of a head a power of two (the butterfly needs no pass-through)
    if not (head_dim % tk.BLOCK == 0 or head_dim & (head_dim - 1) == 0):
        return f"turbo_kv with head_dim {head_dim} (a power of two or a multiple of 128 only)"
    return None


def supported(model: "Model", cache: "KVCache") -> str | None:
    """None when the fused step can run ``model`` with ``cache``; else the reason it cannot."""
    from .model import on_gpu

    a, w = model.args, model.weights
    if model.sync != "step":
        return "per-op sync"
    if not getattr(a, "llama_block", True):
        return f"architecture {getattr(a, 'arch', '?')} (llama's block only)"
    why_not = _cache_supported(cache, a.head_dim)
    if why_not:
        return why_not
    if cache.length == 0:
        return "an empty cache (prefill first)"
    lins = [w.output, w.token_embd] + [m for lw in w.layers for m in lw.linears]
    if any(lin.bits not in (0, 4, 8) or (lin.bits and (lin.group_size != 32 or
                                                        lin.scales.dtype != mx.float32))
           for lin in lins):
        return "quantized weights other than 4 or 8 bits in groups of 32, float32 scales"
    if any(lw.wqkv.whole is None or lw.w_gate_up.whole is None for lw in w.layers):
        return "unfused projections"
    # every input width a whole number of 32-element groups (and so of float4 loads)
    if (a.dim % 32 or a.hidden_dim % FFN_UNITS or (a.n_heads * a.head_dim) % 32 or a.head_dim % WARP
            or a.head_dim > ATTEND_WARPS * WARP or a.n_heads % a.n_kv_heads or a.rope_dim % 2):
        return "shapes the kernels do not cover"
    cuda = getattr(mx, "cuda", None)
    if not (on_gpu() and cuda is not None and cuda.is_available()):
        return "not on a CUDA GPU"
    return None


_LAUNCHABLE: dict = {}


def launchable(model: "Model", cache: "KVCache") -> str | None:
    """None when the GPU can launch every kernel the fused step would run for ``model`` and a
    cache like ``cache``; else why not. Measured once per model and cache type, on a throwaway
    cache (one prefilled token; capacities 256 and 512, the one-pass and the split attention):
    the CUDA compiler on the machine decides each kernel's registers, and a kernel of 512
    threads that needs more than 128 a thread cannot launch ("too many resources requested for
    launch": Llama-3.2-3B's shapes on the H200, docs/benchmarks.md). ``supported`` first."""
    from .cache import STEP

    turbo = TurboSpec.of(cache)
    key = (id(model), cache.kind, turbo)
    if key not in _LAUNCHABLE:
        opts = dict(v=turbo.v_type, k_window=turbo.window, score_path=turbo.path) if turbo else {}
        probe = model.make_cache(cache.kind, **opts)
        mx.eval(model.forward([1], probe, last_only=True), probe.state())
        why = None
        for capacity in (STEP, 2 * STEP):
            probe.reserve(capacity)
            k, v = probe.take_buffers()
            window = [probe.take_window()] if probe.k_window else []
            try:
                mx.eval(FusedStep(model, turbo)(mx.array([1], mx.uint32), position(1), k, v,
                                                *window)[0])
            except RuntimeError as e:
                if "too many resources" not in str(e):
                    raise
                why = f"a fused kernel cannot launch on this GPU ({e})"
                break
            probe.give_buffers(k, v, 0)
        _LAUNCHABLE[key] = why
    return _LAUNCHABLE[key]


class FusedStep:
    """One decoded token as fused kernels: ``step(token [1], pos int32 [4], k, v, kw=None) ->
    (logits [1, vocab], k, v)`` where ``k``, ``v`` are the cache's per-layer buffers
    (:meth:`KVCache.take_buffers`), returned updated, and ``kw`` the k-window's float keys per
    layer (:meth:`KVCache.take_window`, turbo_kv caches with a k-window only), updated in place.
    Pure graph building: no evaluation. ``turbo`` (:meth:`TurboSpec.of` the cache): attention
    reads turbo_kv blocks (``turbo_attend.cu``); None: fp32 / fp16 buffers (``attend.cu``).

    It owns a scratch buffer per split product (``fd_project``: the blocks' partial sums and a
    counter of finished blocks), which its kernels write in place and leave ready for the next
    launch; one step's kernels run in order, each consuming the last one's output, so the
    layers share them."""

    def __init__(self, model: "Model", turbo: TurboSpec | None = None):
        a, w = model.args, model.weights
        self.args, self.weights, self.turbo = a, w, turbo
        self.consts = (a.norm_eps, 1.0 / math.sqrt(a.head_dim))
        self.inv_freq = mx.array(_inv_freq(a, None if w.rope_freqs is None
                                           else np.array(w.rope_freqs)))
        # float32 [slots * dim + 4]: the slots' partial sums, then a counter (zero bits: 0);
        # from NumPy, so that they exist before the first step without an evaluation
        self.scratch = {name: mx.array(np.zeros(slots * a.dim + 4, np.float32))
                        for name, slots in (("attend", a.n_heads),
                                            ("ffn", a.hidden_dim // FFN_UNITS))}

    def __call__(self, token: mx.array, pos: mx.array, k: list, v: list,
                 kw: list | None = None):
        w = self.weights
        # turbo_kv: this token's key is quantized inside attention, from float32
        kv_dtype = mx.float32 if self.turbo else None
        x = self.embed(token, w.token_embd)  # [dim]
        for layer, lw in enumerate(w.layers):
            # [n_kv_heads, capacity, head_dim] (fp32 / fp16), or turbo_kv blocks [n_kv_heads,
            # capacity, n_chunks, block_bytes] and values as their codec stores them
            (kbuf,), (vbuf,) = k[layer], v[layer]
            q, kv = self.norm_qkv_rope(x, lw, pos, kv_dtype or kbuf.dtype)
            x = self.attend_project(q, kv, kbuf, vbuf, pos, lw.wo, x,
                                    kw=None if kw is None else kw[layer])  # [dim]
            x = self.ffn(x, lw)  # [dim]
        return self.norm_matvec(x, w.output_norm, w.output).reshape(1, -1), k, v

    # One kernel each (two for attention past ATTEND_SPLIT_KEYS of capacity) -----------------
    def embed(self, token: mx.array, table: "Linear") -> mx.array:
        """Row ``token [1]`` of ``table [vocab, dim]`` -> ``float32 [dim]`` (dequantized)."""
        n = self.args.dim
        (out,) = _kernel("embed", *self.consts, _quantized(table))(
            inputs=[token, *_arrays(table)], template=[("IN", n), ("BITS", table.bits)],
            output_shapes=[(n,)], output_dtypes=[mx.float32], grid=(n, 1, 1),
            threadgroup=(min(n, 256), 1, 1))
        return out

    def norm_qkv_rope(self, x: mx.array, lw, pos: mx.array, kv_dtype) -> tuple[mx.array, mx.array]:
        """``x [dim]`` -> q ``float32 [n_heads * head_dim]`` and k|v ``[2 * n_kv_heads *
        head_dim]`` in ``kv_dtype``, RoPE applied to q and k at position ``pos``."""
        a, wqkv = self.args, lw.wqkv.whole
        q_rows, kv_rows = a.n_heads * a.head_dim, 2 * a.n_kv_heads * a.head_dim
        units = (q_rows + kv_rows) // 2
        return _kernel("norm_qkv_rope", *self.consts, _quantized(wqkv))(
            inputs=[x, lw.attn_norm, *_arrays(wqkv), pos, self.inv_freq],
            template=[("IN", a.dim), ("UNITS", units), ("BITS", wqkv.bits), ("HD", a.head_dim),
                      ("Q_ROWS", q_rows), ("QK_ROWS", q_rows + kv_rows // 2)],
            output_shapes=[(q_rows,), (kv_rows,)], output_dtypes=[mx.float32, kv_dtype],
            **_rows_launch(units))

    def attend_project(self, q: mx.array, kv: mx.array, kbuf: mx.array, vbuf: mx.array,
                       pos: mx.array, wo: "Linear", r: mx.array, warps: int = ATTEND_WARPS,
                       unroll: int = ATTEND_UNROLL, kw: mx.array | None = None) -> mx.array:
        """``r + wo(attention)``: ``q [n_heads * head_dim]`` against the cached keys and values
        (``[n_kv_heads, capacity, head_dim]``, or turbo_kv blocks and their values' storage)
        at positions ``0 .. pos - 1`` and this token's ``kv [2 * n_kv_heads * head_dim]`` at
        ``pos``, projected by ``wo [dim, n_heads * head_dim]`` and added to ``r [dim]`` ->
        ``float32 [dim]``. Writes this token into the buffers at ``pos`` (and its float key
        into ``kw [n_kv_heads, window, head_dim]`` at ``pos % window``), in place (see
        ``attend.cu``): the caller owns them.

        One block per head, which also projects its head (``fd_project``). Past
        ATTEND_SPLIT_KEYS of capacity, each head is split among several blocks (one per
        ATTEND_SPLIT_KEYS, at most ATTEND_MAX_SPLITS), whose partial softmaxes a second kernel
        merges and projects: one block per head would leave most of the GPU idle while it
        walks 4k keys."""
        a, turbo = self.args, self.turbo
        hd, nh = a.head_dim, a.n_heads
        splits = max(1, min(ATTEND_MAX_SPLITS, kbuf.shape[1] // ATTEND_SPLIT_KEYS))
        attention = [q, kv, kbuf, vbuf] + ([kw] if turbo and turbo.window else []) + [pos]
        shape = [("NH", nh), ("NKV", a.n_kv_heads), ("HD", hd), ("DPL", hd // WARP),
                 ("NW", warps), ("U", unroll)] + (turbo.template(hd) if turbo else [])
        launch = dict(grid=(nh * splits * warps * WARP, 1, 1), threadgroup=(warps * WARP, 1, 1))
        project = [*_arrays(wo), r, self.scratch["attend"]]
        project_shape = [("DIM", a.dim), ("BITS", wo.bits)]
        name = "turbo_attend" if turbo else "attend"
        # 8-bit wo: its projection inlined into attention takes ~168 registers a thread, more
        # than 512 threads an SM may hold ("too many resources requested for launch" on the
        # H200): the split form instead, whose merge of one split gives the same bits
        if splits == 1 and wo.bits != 8:
            (out,) = _kernel(f"{name}_project", *self.consts, _quantized(wo), turbo)(
                inputs=attention + project, template=shape + project_shape,
                output_shapes=[(a.dim,)], output_dtypes=[mx.float32], **launch)
            return out
        (part,) = _kernel(f"{name}_split", *self.consts, (), turbo)(
            inputs=attention, template=shape, output_shapes=[(nh * splits * (hd + 2),)],
            output_dtypes=[mx.float32], **launch)
        (out,) = _kernel("attend_merge_project", *self.consts, _quantized(wo))(
            inputs=[part] + project, template=[("NH", nh), ("HD", hd)] + project_shape,
            output_shapes=[(a.dim,)], output_dtypes=[mx.float32],
            grid=(nh * max(ROWS_THREADS, hd), 1, 1), threadgroup=(max(ROWS_THREADS, hd), 1, 1))
        return out

    def attend_scores(self, q: mx.array, kv: mx.array, kbuf: mx.array, vbuf: mx.array,
                      pos: mx.array, kw: mx.array | None = None,
                      warps: int = ATTEND_WARPS) -> tuple[mx.array, mx.array]:
        """For checks: what ``turbo_attend.cu`` computes for one layer, one block per head,
        with every score kept: ``(scores float32 [n_heads, capacity], parts float32 [n_heads,
        head_dim + 2])`` (scores times 1/sqrt(head_dim) at positions ``<= pos``; parts: the
        unnormalized output, the maximum and the total of the softmax). Writes this token
        into the buffers, as :meth:`attend_project` does."""
        a, turbo = self.args, self.turbo
        hd, nh = a.head_dim, a.n_heads
        inputs = [q, kv, kbuf, vbuf] + ([kw] if turbo.window else []) + [pos]
        template = [("NH", nh), ("NKV", a.n_kv_heads), ("HD", hd), ("DPL", hd // WARP),
                    ("NW", warps), ("U", ATTEND_UNROLL)] + turbo.template(hd)
        parts, scores = _kernel("turbo_attend_scores", *self.consts, (), turbo)(
            inputs=inputs, template=template, output_shapes=[(nh, hd + 2), (nh, kbuf.shape[1])],
            output_dtypes=[mx.float32, mx.float32], grid=(nh * warps * WARP, 1, 1),
            threadgroup=(warps * WARP, 1, 1), init_value=0.0)
        return scores, parts

    def ffn(self, x: mx.array, lw) -> mx.array:
        """``x + w_down(silu(gate) * up)`` of ``rms_norm(x)``: ``x [dim]`` -> ``float32 [dim]``.
        Blocks of FFN_UNITS hidden units each, their down projections summed by ``fd_project``."""
        a, gate_up, down = self.args, lw.w_gate_up.whole, lw.w_down
        (out,) = _kernel("ffn", *self.consts, _quantized(gate_up, down))(
            inputs=[x, lw.ffn_norm, *_arrays(gate_up), *_arrays(down), self.scratch["ffn"]],
            template=[("IN", a.dim), ("H", a.hidden_dim), ("SL", FFN_UNITS),
                      ("BITS", gate_up.bits), ("BITS2", down.bits)],
            output_shapes=[(a.dim,)], output_dtypes=[mx.float32],
            grid=(a.hidden_dim // FFN_UNITS * FFN_WARPS * WARP, 1, 1),
            threadgroup=(FFN_WARPS * WARP, 1, 1))
        return out

    def norm_matvec(self, x: mx.array, norm: mx.array, lin: "Linear") -> mx.array:
        """``lin(rms_norm(x))``: ``x [in]`` -> ``float32 [out]`` (the logits), one warp per
        output."""
        units = lin.weight.shape[0]
        (out,) = _kernel("norm_matvec", *self.consts, _quantized(lin))(
            inputs=[x, norm, *_arrays(lin)], template=[("IN", _in_features(lin)),
                                                       ("UNITS", units), ("BITS", lin.bits)],
            output_shapes=[(units,)], output_dtypes=[mx.float32], **_rows_launch(units))
        return out


def _quantized(*lins: "Linear") -> tuple[bool, ...]:
    return tuple(bool(lin.bits) for lin in lins)


def _arrays(lin: "Linear") -> list[mx.array]:
    """A weight's arrays as the kernels take them: ``w``, or ``w, scales, biases``."""
    return [lin.weight, lin.scales, lin.biases] if lin.bits else [lin.weight]


def _in_features(lin: "Linear") -> int:
    return lin.weight.shape[1] * 32 // lin.bits if lin.bits else lin.weight.shape[1]


def position(n: int) -> mx.array:
    """The position input of :class:`FusedStep`: ``int32 [4]``, every element ``n``. Four, not
    one: see :func:`_kernel` on scalars. Advance it on the device, ``pos + position(1)``
    (``pos + 1`` would read the 1 from that pool), rather than building one each token."""
    return mx.array(np.full(4, n, np.int32))


def _inv_freq(a, rope_freqs: np.ndarray | None) -> np.ndarray:
    """``float32 [head_dim / 2]``: the angle per position of each adjacent pair of a head, as
    :func:`quantref_mlx.model.rope` turns it (``rope_freqs`` divides, ``rope_scale`` divides the
    position); 0 for pairs past ``rope_dim``, which RoPE leaves alone."""
    half = a.rope_dim // 2
    freqs = a.rope_base ** (-np.arange(0, a.rope_dim, 2, dtype=np.float64) / a.rope_dim)
    if rope_freqs is not None:
        freqs = freqs / np.asarray(rope_freqs, np.float64)[:half]
    out = np.zeros(a.head_dim // 2, np.float64)
    out[:half] = freqs / a.rope_scale
    return out.astype(np.float32)
