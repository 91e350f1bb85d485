"""A decode step in one kernel launch: every layer, the final norm, the logits and the greedy
token, in ``persistent.cu``.

Why: the fused step (:mod:`quantref_mlx.fused_decode`) runs ~95 kernels a token, and MLX's CUDA
backend spends host time on each (it rebuilds its CUDA graph at every evaluation). Here one
block per SM runs the whole token, with a wait of every block between dependent phases: one
launch, one evaluation, per token. Two ways to cut the work (``form``):

- ``"fused"``: the blocks take, in turn, the blocks of each of the fused step's kernels, calling
  their own functions (``fused_common.cuh``, ``turbo_attend.cuh``) with the same block indices:
  every sum in the same order, so the logits are the fused step's bit for bit. 3 phases a
  layer (4 where the capacity splits a head's keys, and always for turbo_kv).
- ``"rows"`` (:data:`FORM`, the default: faster at every context measured, 1.2-1.3x the fused
  form on the H200, docs/benchmarks.md): attention in the fused form's split form, but cut by
  the context (a split a head per :data:`ROW_KEYS` positions, as many as give each (head,
  split) a block: one round of the grid), the splits merged once a block; then every
  projection (Wo, gate|up, down) one output row per warp over the whole grid, each a phase of
  its own (5 a layer): all SMs work on each matrix, where the fused step splits it by columns
  among a few blocks and one block sums it. Its sums run in another order: logits within
  4e-6 of the fused step's largest (fp32 / fp16 caches; turbo_kv: 1e-3, where a key on a
  codebook boundary may take the neighbouring index), not bit for bit.

The greedy token is ``argmax``'s (the first index of the largest logit), computed in the kernel.
``steps`` > 1 (greedy decoding): one launch decodes that many tokens, each step's argmax the
next step's input (measured slower than one a launch: docs/benchmarks.md section 3).

Never a hang: a barrier that waits longer than :data:`WAIT_NS` (a block that never started,
because something else held an SM) sets an error flag in the step's scratch, every block
returns, and the token comes back as -1 with the reason; :meth:`PersistentStep.error` turns it
into a :class:`DecodeKernelError`, and the step starts over with a fresh scratch.

Scope: CUDA; llama-block models whose layer matrices are all 4-bit MLX-quantized (the GGUF's
Q4_0 / Q4_1; the embedding and output may be 8-bit or float: at 512 threads a block, 8-bit
layers would need more registers than an SM has), head_dim up to 64; fp32 / fp16 caches
without a k-window, and turbo_kv caches without a k-window (attention: ``fd_turbo_attend``, the
fused step's ``turbo_attend.cu``) (:func:`supported`). The step reads the layers' weights from
three arrays that concatenate them (built once: ~the layers' size again in GPU memory) and the
cache from whole-model buffers ``[n_layers, n_kv_heads, capacity, ...]`` (the decoder stacks
the cache's per-layer buffers once per capacity; the cache keeps slices of them).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
from functools import lru_cache
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from . import fused_decode as fd
from . import kernels

if TYPE_CHECKING:
    from .cache import KVCache
    from .model import Model

__all__ = ["DecodeKernelError", "PersistentStep", "STEPS", "WAIT_NS", "sm_count", "supported"]

WARPS = 16  # warps per block: the fused attention's (fd_attend's order of sums), 8 where the
# machine's compiler needs more than 128 registers a thread (PersistentStep._probe)
WAIT_NS = 1_000_000_000  # the longest a barrier waits (a token takes well under 1 ms)
_MAX_BEST = 1024  # blocks at most (the scratch's per-block argmax slots)
# How a phase ends: "grid", a grid barrier (every block counts itself on one word and polls it:
# cooperative groups' scheme: a fence, an atomic add, volatile loads, a fence); "release", the
# same barrier with a release reduction and acquire loads (CUTLASS's GenericBarrier: no fence
# and no returned value to wait for); "flags", only the blocks that did the phase's work count
# themselves and the last advances a generation that everyone polls (persistent.cuh)
SYNC = "grid"
# How the work is cut: "fused", the fused step's kernels as they are (its logits bit for bit);
# "rows", every projection one output row per warp over the whole grid (persistent.cu)
FORM = "rows"  # the faster at every context measured (docs/benchmarks.md)
# The rows form's attention: one split a head per ROW_KEYS positions of context, up to as many as
# give every (head, split) a block of its own (fd_row_splits, persistent.cuh); 0: as the fused
# step, one split per fused_decode.ATTEND_SPLIT_KEYS of capacity, whatever the grid
ROW_KEYS = 64
ROW_UNROLL = 4  # the rows form's attention: keys a warp loads at once (the fused form: U)
# The rows form's attention on float caches: a block per (KV head, split) for the KV head's
# query heads together (fd_attend_group: each key read once for them), not per (head, split)
ROW_GROUP = False  # measured (docs/benchmarks.md): faster at 8k, slower at 128-4k
ROW_MAX_SPLITS = 48  # the rows form's splits a head at most (the scratch's room)
# Greedy tokens a launch that Decoder(steps=STEPS) and bench/decode_speed.py's
# mlx-persistent-rows8 ask for (Decoder's default is 1: measured slower, docs/benchmarks.md
# section 3). A generation that stops mid-launch has computed up to STEPS - 1 unused tokens.
STEPS = 8

REASONS = {1: f"a grid barrier waited longer than {WAIT_NS / 1e9:g} s: not every block of the "
              "launch was resident (another kernel or process holding SMs?)",
           2: "the input token is outside the vocabulary",
           3: "an earlier launch of this step failed"}


class DecodeKernelError(RuntimeError):
    """The persistent decode kernel stopped instead of finishing a token (see ``REASONS``)."""


@lru_cache(maxsize=None)
def sm_count() -> int | None:
    """Streaming multiprocessors of CUDA device 0 (the CUDA driver's attribute 16), or None
    where there is no driver to ask."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev, n = ctypes.c_int(), ctypes.c_int()
    if (cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(dev), 0) != 0
            or cuda.cuDeviceGetAttribute(ctypes.byref(n), 16, dev) != 0):
        return None
    return n.value


def _roles(lw) -> list:
    """A layer's four matrices in the kernel's order: Wqkv, Wo, W gate|up, W down."""
    return [lw.wqkv.whole, lw.wo, lw.w_gate_up.whole, lw.w_down]


def supported(model: "Model", cache: "KVCache") -> str | None:
    """None when :class:`PersistentStep` can run ``model`` with ``cache``; else why not."""
    why = fd.supported(model, cache)
    if why:
        return why
    turbo = fd.TurboSpec.of(cache)
    if turbo is not None and turbo.window:
        return "a k-window (the persistent step reads turbo_kv caches without one)"
    layers = [_roles(lw) for lw in model.weights.layers]
    # 4 bits only: with 8-bit matrices the kernel needs 168 registers a thread (ptxas, sm_90:
    # tools/nvrtc_check.py --resources), more than 512 resident threads an SM can have
    if any(lin.bits != 4 for roles in layers for lin in roles):
        return "layer weights other than 4-bit (the persistent step reads 4-bit layers)"
    # Registers a thread (ptxas, sm_90; tools/nvrtc_check.py --resources): at most 128 with
    # head_dim 32 / 64, every cache type; 255 (and spills) with head_dim 256
    a = model.args
    if a.hidden_dim > a.n_heads * fd.ATTEND_MAX_SPLITS * (a.head_dim + 2):
        return "a hidden size larger than the scratch the rows form keeps it in"
    if model.args.head_dim > 64:
        return f"head_dim {model.args.head_dim} (the persistent step's registers fit up to 64)"
    blocks = sm_count()
    if not blocks:
        return "no CUDA driver to count the SMs"
    return None


class PersistentStep:
    """``step(token int32 [4], pos int32 [4], kc, vc) -> (next int32 [4 + steps], logits
    float32 [vocab], or [steps, vocab])``: ``steps`` greedily decoded tokens as one launch
    (lazy; builds the graph only). ``token[0]``: the input id (the last launch's ``next``);
    ``pos[0]``: its position (``pos[0] + steps <= capacity``); ``kc``, ``vc``: the whole-model
    cache buffers ``[n_layers, n_kv_heads, capacity, head_dim]``, float32 or float16, or with
    ``turbo`` (:meth:`TurboSpec.of` the cache) turbo_kv blocks ``[n_layers, n_kv_heads,
    capacity, n_chunks, block_bytes]`` and the values' storage, which the kernel writes in
    place (the caller owns them), positions ``pos[0] .. pos[0] + steps - 1``. ``next[4 + s]``:
    the greedy token after step ``s`` (step ``s > 0`` reads step ``s - 1``'s as its input),
    ``next[0]`` the last; or ``next[0]`` -1 with the reason in ``next[1]`` (:meth:`error`)."""

    def __init__(self, model: "Model", turbo: "fd.TurboSpec | None" = None,
                 blocks: int | None = None, warps: int = WARPS, times: bool = False,
                 sync: str = SYNC, form: str = FORM, row_keys: int | None = None,
                 row_unroll: int | None = None, row_group: bool | None = None,
                 steps: int = 1):
        if sync not in ("grid", "release", "flags"):
            raise ValueError(f"sync must be 'grid', 'release' or 'flags', not {sync!r}")
        if form not in ("fused", "rows"):
            raise ValueError(f"form must be 'fused' or 'rows', not {form!r}")
        a, w = model.args, model.weights
        self.args, self.weights, self.turbo = a, w, turbo
        self.blocks = min(blocks or sm_count() or 0, _MAX_BEST)
        if self.blocks < 1:
            raise ValueError("no CUDA device to size the persistent step's grid")
        row_keys = ROW_KEYS if row_keys is None else row_keys
        row_unroll = ROW_UNROLL if row_unroll is None else row_unroll
        if row_keys < 0 or not 1 <= row_unroll <= 16:
            raise ValueError(f"row_keys must be 0 or more and row_unroll 1 to 16, not "
                             f"{row_keys}, {row_unroll}")
        if not 1 <= steps <= 64 or (steps > 1 and (times or sync != "grid")):
            # (a loop of the flags or release barrier's phases is not run on a GPU in tests)
            raise ValueError(f"steps must be 1 to 64 (1 with times=True or sync other than "
                             f"'grid'), not {steps}")
        self.steps = steps
        self.warps, self.times, self.sync, self.form = warps, times, sync, form
        self.row_keys, self.row_unroll = row_keys, row_unroll
        # fd_attend_group: float caches, and its shared memory (warps x G x head_dim floats)
        # within what persistent.cu gives it (GROUP there); else a block per head
        self.row_group = (ROW_GROUP if row_group is None else bool(row_group)) and (
            turbo is None and warps * (a.n_heads // a.n_kv_heads) * a.head_dim <= 4096)
        self._launchable = False  # probed on the first call (see _probe)
        layers = [_roles(lw) for lw in w.layers]
        self.bits = [lin.bits for lin in layers[0]]
        codes, scales, biases, offsets = [], [], [], []
        n_codes = n_groups = 0
        for roles in layers:
            for lin in roles:
                offsets += [n_codes, n_groups]
                codes.append(lin.weight.reshape(-1))
                scales.append(lin.scales.reshape(-1))
                biases.append(lin.biases.reshape(-1))
                n_codes += lin.weight.size
                n_groups += lin.scales.size
        self.codes = mx.concatenate(codes)
        self.scales = mx.concatenate(scales)
        self.biases = mx.concatenate(biases)
        self.woff = mx.array(np.array(offsets, np.int64))
        self.lnw = mx.stack([mx.stack([lw.attn_norm, lw.ffn_norm]) for lw in w.layers])
        self.inv_freq = mx.array(fd._inv_freq(a, None if w.rope_freqs is None
                                              else np.array(w.rope_freqs)))
        # The embedding, copied by the GPU, as the layers' matrices are above: a token reads one
        # row of it, and a GGUF's arrays come from NumPy, which MLX keeps in managed memory
        # that the host wrote; each row's first read would fault its page over. (Every other
        # input is read whole at the first step.)
        self.embedding = [x * 1 for x in fd._arrays(w.token_embd)]
        mx.eval(self.codes, self.scales, self.biases, self.woff, self.lnw, self.inv_freq,
                *self.embedding)
        self.scratch = self._fresh_scratch()
        self.consts = (a.norm_eps, 1.0 / math.sqrt(a.head_dim))

    def _offsets(self) -> tuple[int, int]:
        """(where the timer marks start, the scratch's size), in float32 elements: the
        layout of ``persistent.cu``."""
        a = self.args
        fb = a.hidden_dim // fd.FFN_UNITS
        splits = a.n_heads * max(fd.ATTEND_MAX_SPLITS, ROW_MAX_SPLITS) * (a.head_dim + 2)
        best = (96 + a.n_heads * a.dim + 4 + fb * a.dim + 4 + 2 * a.dim + a.n_heads * a.head_dim
                + 2 * a.n_kv_heads * a.head_dim + -(-splits // 4) * 4)
        marks = best + 2 * _MAX_BEST
        # the marks, then each block's start, then its arrival at the first barrier
        return marks, marks + 2 * (self.max_marks + 2 * _MAX_BEST)

    @property
    def max_marks(self) -> int:
        """Timer marks a token can write: its start, the embedding, up to 5 phases a layer
        (the rows form's), the logits'."""
        return 5 * self.args.n_layers + 4

    def _fresh_scratch(self) -> mx.array:
        # zero: the counters and the error flag; written by the GPU (an MLX fill). Nothing on
        # the host reads it while decoding: a host read (marks(), for bench/decode_phases.py)
        # cost the next step 50-90 us on the H200, the pages it touched moving to the host and
        # faulting back (3 us without the read)
        scratch = mx.zeros((self._offsets()[1],), mx.float32)
        mx.eval(scratch)
        return scratch

    def marks(self) -> np.ndarray:
        """With ``times=True``, after an evaluated step: ns since the step's start at which
        block 0 left each barrier, in order (``uint64``; zeros past the last barrier)."""
        start = self._offsets()[0]
        raw = np.array(self.scratch[start:start + 2 * self.max_marks]).view(np.uint64)
        return (raw[1:] - raw[0]).astype(np.int64).clip(min=0) if raw[0] else raw[1:] * 0

    def starts(self) -> np.ndarray:
        """With ``times=True``, after an evaluated step: ns after block 0's start at which each
        block started (``int64 [blocks]``): how long the launch took to put every block on its
        SM."""
        start = self._offsets()[0]
        raw = np.array(self.scratch[start:start + 2 * (self.max_marks + self.blocks)]).view(
            np.uint64)
        return raw[self.max_marks:].astype(np.int64) - np.int64(raw[0])

    def arrivals(self) -> np.ndarray:
        """With ``times=True``, after an evaluated step: ns after block 0's start at which each
        block reached the first barrier, its embedding row written (``int64 [blocks]``)."""
        start = self._offsets()[0]
        raw = np.array(self.scratch[start:self._offsets()[1]]).view(np.uint64)
        at = self.max_marks + _MAX_BEST
        return raw[at:at + self.blocks].astype(np.int64) - np.int64(raw[0])

    def _probe(self, kc: mx.array, vc: mx.array) -> None:
        """Launch once with an invalid token (every block returns at once, touching nothing):
        a block of 16 warps needs at most 128 registers a thread, which the CUDA compiler on
        the machine may exceed (MLX then fails with "too many resources requested for
        launch"); 8 warps a block then, whose attention sums in another order than the fused
        step's (its logits then match it within rounding, not bit for bit)."""
        bad = mx.array(np.array([-1, 0, 0, 0], np.int32))
        for warps in (self.warps, 8):
            self.warps = warps
            try:
                mx.eval(self._launch(bad, fd.position(0), kc, vc))
                self._launchable = True
                return
            except RuntimeError as e:
                if "too many resources" not in str(e) or warps == 8:
                    raise

    def __call__(self, token: mx.array, pos: mx.array, kc: mx.array, vc: mx.array):
        if not self._launchable:
            self._probe(kc, vc)
        return self._launch(token, pos, kc, vc)

    def _launch(self, token: mx.array, pos: mx.array, kc: mx.array, vc: mx.array):
        a, w = self.args, self.weights
        emb, out = w.token_embd, w.output
        inputs = ([token, pos] + self.embedding + [w.output_norm] + fd._arrays(out)
                  + [self.lnw, self.codes, self.scales, self.biases, self.woff, self.inv_freq,
                     kc, vc, self.scratch])
        template = [("DIM", a.dim), ("NL", a.n_layers), ("NH", a.n_heads),
                    ("NKV", a.n_kv_heads), ("HD", a.head_dim), ("DPL", a.head_dim // fd.WARP),
                    ("NW", self.warps), ("U", fd.ATTEND_UNROLL), ("H", a.hidden_dim),
                    ("SL", fd.FFN_UNITS), ("VOCAB", out.weight.shape[0]),
                    ("BQKV", self.bits[0]), ("BO", self.bits[1]), ("BGU", self.bits[2]),
                    ("BDN", self.bits[3]), ("EBITS", emb.bits), ("OBITS", out.bits)]
        if self.turbo is not None:
            template += self.turbo.template(a.head_dim)
        vocab = out.weight.shape[0]
        logits, nxt = _kernel(*self.consts, bool(emb.bits), bool(out.bits), self.turbo,
                              self.times, self.sync == "flags", self.form == "rows",
                              self.row_keys, self.row_unroll, self.sync == "release",
                              self.row_group, ROW_MAX_SPLITS, self.steps)(
            inputs=inputs, template=template,
            output_shapes=[(vocab,) if self.steps == 1 else (self.steps, vocab),
                           (4 + self.steps,)],
            output_dtypes=[mx.float32, mx.int32],
            grid=(self.blocks * self.warps * fd.WARP, 1, 1),
            threadgroup=(self.warps * fd.WARP, 1, 1))
        return nxt, logits

    def error(self, code: int) -> DecodeKernelError:
        """The error for a failed launch's ``next[1]``; the step's scratch starts over."""
        self.scratch = self._fresh_scratch()
        return DecodeKernelError(f"persistent decode step ({self.blocks} blocks): "
                                 f"{REASONS.get(code, f'unknown failure {code}')}")


@lru_cache(maxsize=None)
def _kernel(eps: float, scale: float, embed_quantized: bool, out_quantized: bool,
            turbo: "fd.TurboSpec | None" = None, times: bool = False, flags: bool = False,
            rows: bool = False, row_keys: int = ROW_KEYS, row_unroll: int = ROW_UNROLL,
            acqrel: bool = False, row_group: bool = ROW_GROUP,
            row_max_splits: int = ROW_MAX_SPLITS, steps: int = 1):
    none = "((const float*)nullptr), ((const float*)nullptr)"
    names = ["token", "pos", "wemb"] + (["wemb_scales", "wemb_biases"] if embed_quantized else [])
    names += ["onw", "wout"] + (["wout_scales", "wout_biases"] if out_quantized else [])
    names += ["lnw", "codes", "scales", "biases", "woff", "inv_freq", "kc", "vc", "scratch"]
    header = (fd._constants(eps, scale, False)
              + f"#define FD_QUANT_E {'wemb_scales, wemb_biases' if embed_quantized else none}\n"
              + f"#define FD_QUANT_O {'wout_scales, wout_biases' if out_quantized else none}\n"
              + f"#define FD_OUT_SCALES {'wout_scales' if out_quantized else 'nullptr'}\n"
              + f"#define FD_OUT_BIASES {'wout_biases' if out_quantized else 'nullptr'}\n"
              + f"#define FD_MAX_SPLITS {fd.ATTEND_MAX_SPLITS}\n"
              + f"#define FD_SPLIT_KEYS {fd.ATTEND_SPLIT_KEYS}\n"
              + f"#define FD_WAIT_NS {WAIT_NS}ull\n"
              + f"#define FD_TURBO {int(turbo is not None)}\n"
              + f"#define FD_TIMES {int(times)}\n#define FD_MAX_BLOCKS {_MAX_BEST}\n"
              + f"#define FD_FLAGS {int(flags)}\n#define FD_ROWS {int(rows)}\n"
              + f"#define FD_ROW_KEYS {int(row_keys)}\n#define FD_ROW_UNROLL {int(row_unroll)}\n"
              + f"#define FD_ACQREL {int(acqrel)}\n#define FD_ROW_GROUP {int(row_group)}\n"
              + f"#define FD_ROW_MAX_SPLITS {row_max_splits}\n#define FD_STEPS {int(steps)}\n"
              + kernels.source("fused_common.cuh") + kernels.source("persistent.cuh"))
    if turbo is not None:
        header += turbo.header() + kernels.source("turbo_attend.cuh")
    source = kernels.source("persistent.cu")
    digest = hashlib.sha256((header + source).encode()).hexdigest()[:12]
    return mx.fast.cuda_kernel(name=f"persistent_{digest}", input_names=names,
                               output_names=["logits", "next"], source=source, header=header)
