"""Text generation in MLX: :mod:`quantref.generate`'s loop, one evaluation per token.

A decode step (:func:`decode_step`) only *builds* the token's graph: all layers, the cache
update, the logits and the sampling; the loop evaluates it once. As in mlx-lm, step n+1's graph
is built while step n runs (``mx.async_eval``), and the only host transfer per token is reading
the sampled id back (``.item()``), the output itself or, from a CUDA kernel, an 8-byte copy of
it (:func:`_host_copy`) (a sampled, not greedy, step also
sends the draw's one float the other way). Sampling is :mod:`quantref.generate`'s: llama.cpp's
chain and random stream, so a seed gives the same tokens here as there where the logits agree.
The prompt is prefilled in chunks, one evaluation per chunk.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import mlx.core as mx

import numpy as np

from quantref.generate import (GenerationResponse, Responder, SamplerArgs, SamplerRNG, collect,
                               prompt_ids)

from .cache import STEP
from .fused_decode import FusedStep, TurboSpec, launchable, position, supported
from .persistent_decode import PersistentStep
from .persistent_decode import supported as persistent_supported

if TYPE_CHECKING:
    from .cache import KVCache
    from .model import Model

__all__ = ["Decoder", "GenerationResponse", "Sampler", "SamplerArgs", "SamplerRNG",
           "apply_penalties", "candidates", "decode_step", "descending", "generate", "greedy",
           "make_sampler", "stream_generate"]

SamplerFn = Callable[[mx.array], mx.array]


def apply_penalties(z: mx.array, args: SamplerArgs, window: mx.array | None) -> mx.array:
    """:func:`quantref.generate.apply_penalties` as graph ops: ``z float32 [vocab]`` and the
    window's token ids ``int32 [n]`` (entries < 0 are empty slots) -> the penalized logits
    ``float32 [vocab]``; the counts are a scatter-add, so no host transfer."""
    if window is None or window.size == 0:
        return z
    vocab = z.shape[-1]
    ids = mx.where((window >= 0) & (window < vocab), window, vocab)  # empty slots: a spare bin
    counts = mx.zeros((vocab + 1,), mx.float32).at[ids].add(1.0)[:vocab]
    rp = mx.array(args.repeat_penalty, mx.float32)
    pen = mx.where(z <= 0, z * rp, z / rp)
    pen = pen - (counts * mx.array(args.frequency_penalty, mx.float32)
                 + mx.array(args.presence_penalty, mx.float32))
    return mx.where(counts > 0, pen, z)


def _sort_key(z: mx.array) -> mx.array:
    """A unique int64 per entry of ``z float32 [n]`` that orders like (value, -index): the
    value's order-preserving integer image times 2**24 plus the reversed index (vocabularies
    up to 2**24 tokens)."""
    n = z.shape[-1]
    bits = mx.view(z + 0.0, mx.int32)  # + 0.0 makes -0.0 equal to 0.0, as C++ compares them
    ordered = mx.where(bits < 0, bits ^ 0x7FFFFFFF, bits).astype(mx.int64)
    return ordered * (1 << 24) + ((1 << 24) - 1 - mx.arange(n, dtype=mx.int64))


def descending(z: mx.array, k: int | None = None) -> mx.array:
    """:func:`quantref.generate.descending`: indices of ``z float32 [n]`` from the largest value
    to the smallest, equal values in index order, whether or not the backend's sort is stable
    (the sort key is unique per entry); ``k``: only the first k of them, found by a partition
    and then sorted (k log k instead of n log n). ``[n or k] uint32``."""
    key = -_sort_key(z)
    if k is None or k >= key.size:
        return mx.argsort(key)
    part = mx.argpartition(key, kth=k - 1)[:k]
    return part[mx.argsort(key[part])]


def candidates(z: mx.array, args: SamplerArgs) -> tuple[mx.array, mx.array, mx.array]:
    """:func:`quantref.generate.candidates` with fixed shapes: ``z float32 [vocab]`` (penalized)
    -> ``(ids [n], logits float32 [n], kept bool [n])`` in llama.cpp's candidate order (sorted
    once top-k or top-p runs, else token order); ``n`` is ``min(top_k, vocab)`` with top-k,
    else ``vocab``; a token dropped by top-p or min-p stays in place with ``kept`` false."""
    if args.top_k or args.top_p < 1.0:
        ids = descending(z, min(args.top_k, z.shape[-1]) if args.top_k else None)
        z = z[ids]
    else:
        ids = mx.arange(z.shape[-1])
    n = z.shape[-1]
    pos = mx.arange(n)
    kept = mx.ones((n,), mx.bool_)
    if args.top_p < 1.0:
        p = mx.exp(z - z[0])
        run = mx.cumsum(p / mx.sum(p))
        reached = run >= mx.array(args.top_p, mx.float32)
        # the first position whose running sum reaches top_p, or all (rounding short of it)
        last = mx.where(mx.any(reached), mx.argmax(reached), n)
        kept = pos <= last
    if args.min_p > 0:
        top = mx.max(mx.where(kept, z, -mx.inf))
        kept = kept & (z >= top + float(np.log(np.float32(args.min_p))))
    return ids, z, kept


class Sampler:
    """``logits [1, vocab] -> token [1]`` as graph ops: :func:`quantref.generate.sample` with
    the uniform draw taken on the host from a :class:`quantref.generate.SamplerRNG` (one per
    call, so the same seed gives the same draws as the NumPy backend) and the penalty window
    kept on the device: each call appends its own (lazy) token, so building the next step's
    graph never waits for this one's value. ``history``: the prompt's ids, which the window
    starts from."""

    def __init__(self, args: SamplerArgs, rng: SamplerRNG | None = None,
                 history: Sequence[int] = ()):
        self.args, self.rng = args, rng if rng is not None else SamplerRNG()
        self.window = None
        if args.penalized:
            w = [int(t) for t in args.window(list(history))]
            if args.repeat_last_n > 0:  # a fixed-size ring: empty slots are -1
                w = [-1] * (args.repeat_last_n - len(w)) + w
            self.window = mx.array(w, mx.int32)

    def __call__(self, logits: mx.array) -> mx.array:
        args = self.args
        z = apply_penalties(logits.reshape(-1).astype(mx.float32), args, self.window)
        u = self.rng.uniform()
        if args.temp == 0:
            y = mx.argmax(z, keepdims=True)
        else:
            ids, z, kept = candidates(z, args)
            z = z / mx.array(args.temp, mx.float32)
            p = mx.where(kept, mx.exp(z - mx.max(mx.where(kept, z, -mx.inf))), 0.0)
            run = mx.cumsum(p)
            # llama_sampler_dist_apply: the first kept candidate whose running sum reaches u*sum
            i = mx.argmax(kept & (run >= run[-1] * mx.array(u, mx.float32)))
            y = ids[i].reshape(1).astype(mx.uint32)
        if self.window is not None:
            tail = self.window[1:] if self.args.repeat_last_n > 0 else self.window
            self.window = mx.concatenate([tail, y.astype(mx.int32)])
        return y.reshape(logits.shape[:-1])


def greedy(logits: mx.array) -> mx.array:
    """``logits [..., vocab] -> [...]``: the first index of the largest logit."""
    return mx.argmax(logits, axis=-1)


greedy.greedy = True  # Decoder: the persistent kernel's own argmax may stand in for it


def _host_copy(y: mx.array) -> mx.array:
    """``y`` (one element) as a view of an 8-byte copy of it: what the host reads back each
    token. Why: MLX on CUDA keeps a kernel's output in device memory, and the host reading it
    moves the whole buffer into managed memory (a new allocation and a copy, each token), which
    later outputs then reuse, the GPU faulting its pages back; arrays of 8 bytes or less live in
    one small pool of managed memory that both sides map (docs/benchmarks.md section 4)."""
    return mx.concatenate([y.reshape(-1)] * 2)[:1].reshape(y.shape)


def make_sampler(args: SamplerArgs, rng: SamplerRNG | None = None,
                 history: Sequence[int] = ()) -> SamplerFn:
    """``logits [1, vocab] -> token [1]`` as graph ops: the plain argmax (:func:`greedy`) when
    greedy with no penalty, else a :class:`Sampler` (``rng``: the draws' stream, a random seed
    if None; ``history``: the prompt's token ids, for the penalties)."""
    if args.temp == 0 and not args.penalized:
        return greedy
    return Sampler(args, rng, history)


def decode_step(model: "Model", token: mx.array, cache: "KVCache",
                sampler: SamplerFn) -> mx.array:
    """The graph of one decoded token: ``token [1]`` -> the next token ``[1]`` (lazy)."""
    logits = model.forward(token, cache, last_only=True)  # [1, vocab]
    return sampler(logits)


class Decoder:
    """Decode steps against one cache: ``decoder(token [1]) -> next token [1]`` (lazy).

    Three ways to build a step, all one evaluation per token:

    - fused (``fused=True``): :mod:`quantref_mlx.fused_decode`, three custom kernels per layer
      instead of ~17 operations; CUDA GPUs, float or 4/8-bit weights, fp32 / fp16 and turbo_kv
      caches
      (:func:`quantref_mlx.fused_decode.supported`). ``fused=None`` (default) uses it wherever
      it is supported, compiled: the fastest step measured there (H200, SmolLM2-135M shapes,
      context 128: ~790 tokens/s against ~220 for the plain graph; ``docs/benchmarks.md``).
    - compiled (``mx.compile``): the cache's buffers are held at a fixed capacity (a power of
      two, at least 256 tokens) and the position is an array, so every step has the same shapes
      and one trace per capacity serves them all; compiling fuses element-wise operations and
      replaces building the step's graph op by op in Python with one call. ``compiled=None``
      (default) compiles the fused step, and the plain graph for turbo_kv caches on a GPU,
      whose score path is many small element-wise operations (~65 against ~30 tokens/s eager
      at context 128); not the plain graph of fp32/fp16 caches, whose steps are matmuls and
      fused attention already (compiling did not help them). Never compiled: ``sync="op"``
      models (the per-op pattern is the point there), caches with a k-window, and turbo_kv
      caches on the CPU (see ``__init__``).
    - otherwise the plain graph, built op by op (:func:`decode_step`).

    ``persistent=True``: the whole token in one kernel launch
    (:mod:`quantref_mlx.persistent_decode`; CUDA, 4-bit layers, fp32 / fp16 and turbo_kv caches
    without a k-window), the same
    logits as the fused step bit for bit; with a greedy sampler (:func:`greedy`) the kernel's
    own argmax is the token. Read tokens back through :meth:`check`, which raises if the
    kernel stopped instead of finishing. ``persistent=True`` runs its default form
    (:data:`~quantref_mlx.persistent_decode.FORM`, rows); ``"grid"`` / ``"flags"`` the fused
    form (the fused step's kernels as they are, its logits bit for bit), phases ending at grid
    barriers / on flags; ``"rows"`` the rows form; ``None``: wherever it runs
    (:func:`quantref_mlx.persistent_decode.supported`). ``steps`` > 1 with a greedy sampler:
    each launch decodes ``steps`` tokens, the kernel feeding its own argmax back in, and calls
    hand them out one by one (the same tokens and logits as one launch a token, bit for bit); a
    call with any other token than the one handed out starts a new launch from it. Measured
    slower on the H200 (docs/benchmarks.md section 3), hence 1 by default; other samplers
    always 1. With turbo_kv caches
    or the fused form the looping kernel needs more registers than 16 warps a block may have
    (8 then, ``PersistentStep._probe``).
    """

    def __init__(self, model: "Model", cache: "KVCache", sampler: SamplerFn,
                 compiled: bool | None = None, fused: bool | None = None,
                 persistent: bool | str | None = False, steps: int = 1):
        from .cache import StepCache, TurboKeyCodec
        from .model import on_gpu

        self.model, self.cache, self.sampler = model, cache, sampler
        self.persistent = None
        if persistent is None:  # wherever it runs
            persistent = persistent_supported(model, cache) is None
        if persistent:
            why = persistent_supported(model, cache)
            if why:
                raise ValueError(f"no persistent decode step here: {why}")
            self.fused, self.compiled = False, False
            kind = {"grid": {"form": "fused", "sync": "grid"},
                    "flags": {"form": "fused", "sync": "flags"},
                    "rows": {"form": "rows", "sync": "grid"}}
            if isinstance(persistent, str) and persistent not in kind:
                raise ValueError(f"persistent must be a bool, None, or one of {sorted(kind)}")
            if not getattr(sampler, "greedy", False):
                steps = 1  # the host's sampler picks each token
            self.persistent = PersistentStep(model, TurboSpec.of(cache), steps=steps, **(
                kind[persistent] if isinstance(persistent, str) else {}))
            self._whole = None  # (kc, vc): the cache's buffers, whole-model
            self._pos = None
            self._next = None  # the last call's (token view, next int32 [4 + steps], logits)
            # the last two launches' next, oldest first: a failed launch's reason (check)
            self._launches = deque(maxlen=2)
            # steps > 1: the launch handing out tokens (next, logits, tokens handed out, the
            # cache length then)
            self._launch = None
            return
        why_not = supported(model, cache)
        if why_not is None and fused is not False:  # every kernel launches on this GPU
            why_not = launchable(model, cache)
        if fused and why_not:
            raise ValueError(f"no fused decode step here: {why_not}")
        self.fused = why_not is None if fused is None else bool(fused)
        turbo = isinstance(cache.k_codec, TurboKeyCodec)
        if compiled is None:
            compiled = self.fused or (turbo and on_gpu())
        # On the CPU, turbo_kv's quantizer is plain MLX ops, and a compiled (fused) kernel may
        # contract a multiply-add and round differently from the oracle; on a GPU it is a
        # custom kernel that rounds every operation explicitly, compiled or not.
        exact_when_fused = on_gpu() or not turbo
        # a k-window's float keys are a growing list in the plain graph: not compiled there
        self.compiled = bool(compiled and model.sync == "step" and exact_when_fused
                             and (self.fused or not cache.k_window))

        self._pos = None  # fused: the position as a device array, advanced on the device
        if self.fused:
            step = FusedStep(model, TurboSpec.of(cache))
        else:
            def step(token, offset, k, v):
                view = StepCache(cache.k_codec, cache.v_codec, k, v, offset)
                logits = model.forward(token, view, last_only=True)
                return logits, view.k, view.v

        # None: the plain graph, built op by op each step (decode_step)
        self._step = mx.compile(step) if self.compiled else step if self.fused else None

    def __call__(self, token: mx.array) -> mx.array:
        if self.persistent is not None:
            return self._persistent_step(token)
        if self._step is None:
            return decode_step(self.model, token, self.cache, self.sampler)
        cache = self.cache
        need = cache.length + 1
        if cache.capacity < need:
            # a compiled step retraces when the capacity changes: grow it geometrically
            cache.reserve(max(STEP, 1 << (need - 1).bit_length()) if self.compiled
                          else -(-need // STEP) * STEP)
        k, v = cache.take_buffers()
        if not self.fused:
            logits, k, v = self._step(token, mx.array(cache.length, dtype=mx.int32), k, v)
            cache.give_buffers(k, v, 1)
            return self.sampler(logits)
        # The fused step reads nothing the host writes during decoding (see
        # quantref_mlx.fused_decode._kernel): the position advances on the device, and the
        # sampled id is handed out as a view of an 8-byte copy, so that reading it back does not
        # pull MLX's pool of small arrays (where the sampler writes) over to the host.
        if self._pos is None or self._pos[1] != cache.length:
            self._pos = (position(cache.length), cache.length)
            self._one = position(1)
        pos = self._pos[0]
        window = [cache.take_window()] if cache.k_window else []  # written in place
        logits, k, v = self._step(token, pos, k, v, *window)
        self._pos = (pos + self._one, cache.length + 1)
        cache.give_buffers(k, v, 1)
        if window:
            cache.give_window(window[0])
        y = self.sampler(logits)
        return y if y.size != 1 else _host_copy(y)


    def _persistent_step(self, token: mx.array) -> mx.array:
        """One launch (:mod:`quantref_mlx.persistent_decode`) for ``steps`` tokens: the cache's
        per-layer buffers are stacked into whole-model ones once per capacity (the cache keeps
        views of them), the position advances on the device, and with a greedy sampler the
        token never leaves the device: the kernel's own argmax feeds the next step, inside the
        launch (``steps`` > 1) and into the next launch. A call whose ``token`` is the token
        the last call handed out gets the launch's next one, already computed; any other token
        starts a new launch from it."""
        cache, step = self.cache, self.persistent
        cur = self._launch
        if cur is not None and self._next is not None and token is self._next[0] \
                and cur[3] == cache.length and cur[2] < step.steps:
            return self._hand_out(cur)  # a token this launch has already decoded
        need = cache.length + step.steps
        if self._whole is None or cache.capacity < need:
            cache.reserve(max(STEP, 1 << (need - 1).bit_length()))  # geometric: few restacks
            k, v = cache.take_buffers()
            whole = tuple(mx.stack([b[0] for b in bufs]) for bufs in (k, v))
            mx.eval(*whole)  # materialized: the kernel writes into this memory
            # The cache's buffers become slices of them, left unevaluated: evaluated when read
            # (after the steps that wrote them), they hold every token written so far. (MLX
            # on CUDA copies a slice when it evaluates it: one evaluated now would stay stale.)
            cache.give_buffers(*[[(w[i],) for i in range(len(k))] for w in whole], 0)
            self._whole = whole
            self._pos = None
        if self._pos is None or self._pos[1] != cache.length:
            self._pos = (position(cache.length), cache.length)
            self._advance = position(step.steps)
        greedy_here = getattr(self.sampler, "greedy", False)
        spent = self._launch is None or self._launch[2] == step.steps
        if greedy_here and self._next is not None and token is self._next[0] and spent:
            token = self._next[1]  # the kernel's own int32 [4 + steps], whose [0] is this token
        else:  # the caller's token, or one handed out mid-launch (the cache moved under it)
            token = mx.concatenate([token.reshape(-1).astype(mx.int32), mx.zeros((3,), mx.int32)])
        launch = self._launch_from(token)
        if step.steps > 1:
            return self._hand_out(launch)
        nxt, logits = launch[:2]
        cache.give_buffers(*cache.take_buffers(), 1)
        if greedy_here:
            y = _host_copy(nxt[4:5])
        else:  # the sampler's token, or -1 where the kernel failed (its logits are garbage)
            y = mx.where(nxt[1:2] == 0, self.sampler(logits.reshape(1, -1)).reshape(-1)
                     .astype(mx.int32), -1)  # (a new 4-byte array: MLX's small pool)
        self._next = (y, nxt, logits)
        return y

    def _launch_from(self, token: mx.array) -> tuple:
        """A launch of ``steps`` greedy tokens from ``token`` (int32 [4 + ...], the id in [0])
        at the device position ``self._pos``: (next, logits, tokens handed out, the cache length
        before its next hand-out); the position advances by ``steps``."""
        step = self.persistent
        nxt, logits = step(token, self._pos[0], *self._whole)
        self._launches.append(nxt)
        at = self._pos[1]
        self._pos = (self._pos[0] + self._advance, at + step.steps)
        return (nxt, logits, 0, at)

    def _hand_out(self, launch: tuple) -> mx.array:
        """The next token of ``launch`` (already decoded, its keys and values in the cache):
        the cache grows by one."""
        nxt, logits, i, at = launch
        y = _host_copy(nxt[4 + i:5 + i])
        self._launch = (nxt, logits, i + 1, at + 1)
        self.cache.give_buffers(*self.cache.take_buffers(), 1)
        self._next = (y, nxt, logits[i])
        return y

    def check(self, token: int) -> int:
        """``token`` as read back from the device; raises
        :class:`~quantref_mlx.persistent_decode.DecodeKernelError` when the persistent kernel
        failed (it returns -1 then, and says why). The reason is the first failed launch's of
        the last two: generation starts the next launch before it reads a token, and that one,
        from the failed launch's -1, fails too (token outside the vocabulary)."""
        if token < 0 and self.persistent is not None:
            codes = [int(nxt[1].item()) for nxt in self._launches]
            self._launch = None  # a failed launch hands out nothing more
            self._launches.clear()
            raise self.persistent.error(next((c for c in codes if c), 0))
        return token


def stream_generate(
    model: "Model",
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    *,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repeat_penalty: float = 1.0,
    repeat_last_n: int = 64,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    seed: int | None = None,
    chat: bool | None = None,
    kv: str = "fp32",
    prefill_step: int = 256,
    compiled: bool | None = None,
    persistent: bool | str | None = False,
    **cache_options: Any,
) -> Iterator[GenerationResponse]:
    """As :func:`quantref.generate.stream_generate`, evaluated once per token (``compiled``,
    ``persistent``: see :class:`Decoder`)."""
    args = SamplerArgs(temp, top_p, top_k, min_p, repeat_penalty, repeat_last_n,
                       frequency_penalty, presence_penalty)
    ids = prompt_ids(model, prompt, max_tokens, chat)
    sampler = make_sampler(args, SamplerRNG(seed), ids)
    cache = model.make_cache(kv, **cache_options)

    start = time.perf_counter()
    for s in range(0, len(ids), prefill_step):
        logits = model.forward(ids[s:s + prefill_step], cache, last_only=True)
        if s + prefill_step < len(ids):
            mx.eval(cache.state())  # one evaluation per prefill chunk
    y = sampler(logits)
    mx.eval(y, cache.state())  # the last chunk and the first sampled token
    respond = Responder(model.tokenizer, len(ids), len(ids) / (time.perf_counter() - start),
                        max_tokens)

    step = Decoder(model, cache, sampler, compiled=compiled, persistent=persistent)
    for n in range(1, max_tokens + 1):
        if n < max_tokens:  # build token n+1's graph and start it before reading token n
            next_y = step(y)
            mx.async_eval(next_y)
        response = respond(step.check(y.item()), peak_memory=mx.get_peak_memory() / 1e9)
        yield response
        if response.finish_reason:
            return
        y = next_y


def generate(model: "Model", prompt: str | Sequence[int], max_tokens: int = 256,
             verbose: bool = False, **kwargs: Any) -> str:
    """The whole completion as text; see :func:`quantref.generate.generate`."""
    return collect(stream_generate(model, prompt, max_tokens, **kwargs), verbose)
