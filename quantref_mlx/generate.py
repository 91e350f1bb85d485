"""Text generation in MLX: :mod:`quantref.generate`'s loop, one evaluation per token.

A decode step (:func:`decode_step`) only *builds* the token's graph: all layers, the cache
update, the logits and the sampling; the loop evaluates it once. As in mlx-lm, step n+1's graph
is built while step n runs (``mx.async_eval``), and the only host transfer per token is reading
the sampled id back (``.item()``), which is the output itself. The prompt is prefilled in chunks,
one evaluation per chunk.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import mlx.core as mx

from quantref.generate import (GenerationResponse, Responder, SamplerArgs, collect,
                               prompt_ids)

from .cache import STEP
from .fused_decode import FusedStep, position, supported

if TYPE_CHECKING:
    from .cache import KVCache
    from .model import Model

__all__ = ["Decoder", "GenerationResponse", "SamplerArgs", "decode_step", "generate",
           "make_sampler", "stream_generate"]

Sampler = Callable[[mx.array], mx.array]


def make_sampler(args: SamplerArgs) -> Sampler:
    """``logits [1, vocab] -> token [1]`` as graph ops (greedy, or temperature / top-k / top-p
    and a draw from MLX's random state)."""
    if args.temp == 0:
        return lambda logits: mx.argmax(logits, axis=-1)

    def sampler(logits: mx.array) -> mx.array:
        z = logits.astype(mx.float32) / args.temp
        if args.top_k and args.top_k < z.shape[-1]:
            kth = mx.sort(z, axis=-1)[..., -args.top_k][..., None]
            z = mx.where(z < kth, -mx.inf, z)
        if args.top_p < 1.0:
            p = mx.softmax(z, axis=-1)
            order = mx.argsort(-p, axis=-1)
            sorted_p = mx.take_along_axis(p, order, axis=-1)
            # keep a token if the mass before it is still short of top_p
            before = mx.cumsum(sorted_p, axis=-1) - sorted_p
            keep_sorted = before < args.top_p
            keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
            z = mx.where(keep, z, -mx.inf)
        return mx.random.categorical(z, axis=-1)

    return sampler


def decode_step(model: "Model", token: mx.array, cache: "KVCache", sampler: Sampler) -> mx.array:
    """The graph of one decoded token: ``token [1]`` -> the next token ``[1]`` (lazy)."""
    logits = model.forward(token, cache, last_only=True)  # [1, vocab]
    return sampler(logits)


class Decoder:
    """Decode steps against one cache: ``decoder(token [1]) -> next token [1]`` (lazy).

    Three ways to build a step, all one evaluation per token:

    - fused (``fused=True``): :mod:`quantref_mlx.fused_decode`, five custom kernels per layer
      instead of ~17 operations; CUDA GPUs, float weights, fp32 / fp16 caches
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
    """

    def __init__(self, model: "Model", cache: "KVCache", sampler: Sampler,
                 compiled: bool | None = None, fused: bool | None = None):
        from .cache import StepCache, TurboKeyCodec
        from .model import on_gpu

        self.model, self.cache, self.sampler = model, cache, sampler
        why_not = supported(model, cache)
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
        self.compiled = bool(compiled and model.sync == "step" and not cache.k_window
                             and exact_when_fused)

        self._pos = None  # fused: the position as a device array, advanced on the device
        if self.fused:
            step = FusedStep(model)
        else:
            def step(token, offset, k, v):
                view = StepCache(cache.k_codec, cache.v_codec, k, v, offset)
                logits = model.forward(token, view, last_only=True)
                return logits, view.k, view.v

        # None: the plain graph, built op by op each step (decode_step)
        self._step = mx.compile(step) if self.compiled else step if self.fused else None

    def __call__(self, token: mx.array) -> mx.array:
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
        logits, k, v = self._step(token, pos, k, v)
        self._pos = (pos + self._one, cache.length + 1)
        cache.give_buffers(k, v, 1)
        y = self.sampler(logits)
        if y.size != 1:
            return y
        return mx.concatenate([y.reshape(-1)] * 2)[:1].reshape(y.shape)


def stream_generate(
    model: "Model",
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    *,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    chat: bool = False,
    kv: str = "fp32",
    prefill_step: int = 256,
    compiled: bool | None = None,
    **cache_options: Any,
) -> Iterator[GenerationResponse]:
    """As :func:`quantref.generate.stream_generate`, evaluated once per token (``compiled``:
    see :class:`Decoder`)."""
    sampler = make_sampler(SamplerArgs(temp, top_p, top_k))
    ids = prompt_ids(model, prompt, max_tokens, chat)
    if seed is not None:
        mx.random.seed(seed)
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

    step = Decoder(model, cache, sampler, compiled=compiled)
    for n in range(1, max_tokens + 1):
        if n < max_tokens:  # build token n+1's graph and start it before reading token n
            next_y = step(y)
            mx.async_eval(next_y)
        response = respond(y.item(), peak_memory=mx.get_peak_memory() / 1e9)
        yield response
        if response.finish_reason:
            return
        y = next_y


def generate(model: "Model", prompt: str | Sequence[int], max_tokens: int = 256,
             verbose: bool = False, **kwargs: Any) -> str:
    """The whole completion as text; see :func:`quantref.generate.generate`."""
    return collect(stream_generate(model, prompt, max_tokens, **kwargs), verbose)
