"""Perplexity in MLX: :func:`quantref.perplexity.perplexity`, one ``mx.eval`` per chunk.

The windows, batching, BOS handling and the result type are the oracle's
(:class:`quantref.perplexity.PerplexityResult`); what differs is that each batch's whole graph
(all layers, the cache updates, the log-softmax, the negative log-likelihoods and the top-1
predictions) is built lazily and evaluated once, then its few numbers cross to the host.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Sequence

import mlx.core as mx
import numpy as np

from quantref.perplexity import (PerplexityResult, _turbo_options, check_reference,
                                 default_text, kl_divergence, make_windows, perturbation_scale,
                                 progress_bar)

if TYPE_CHECKING:
    from .model import Model

__all__ = ["PerplexityResult", "default_text", "kl_divergence", "log_softmax", "perplexity"]


def log_softmax(logits: mx.array) -> mx.array:
    """``logits [B, vocab]`` -> log-probabilities ``float32 [B, vocab]``."""
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def perplexity(
    model: "Model",
    text: str | None = None,
    *,
    ids: Sequence[int] | None = None,
    ctx: int | None = None,
    batch: int = 256,
    kv: str = "fp32",
    v: str | None = None,
    k_window: int = 0,
    score_path: str = "int8_codebook",
    keep_logprobs: bool = False,
    reference: PerplexityResult | None = None,
    perturb: int = 0,
    progress: bool | None = None,
    scoring: str = "all",
) -> PerplexityResult:
    """Same arguments, scoring rules and result as :func:`quantref.perplexity` (see there)."""
    windows = make_windows(model, text, ids, ctx, batch, scoring)
    n_scored = sum(len(w) - 1 - first for w, first in windows)
    check_reference(reference, n_scored)

    nll = np.empty(n_scored, dtype=np.float64)
    argmax = np.empty(n_scored, dtype=np.int32)
    logprobs = (np.empty((n_scored, model.args.vocab_size), dtype=np.float32)
                if keep_logprobs or reference is not None else None)
    scale = perturbation_scale(perturb)
    total = sum(len(w) for w, _ in windows)
    bar = progress_bar(progress, total, f"ppl {kv} (mlx)")
    cache = None
    start = time.perf_counter()
    row = 0
    try:
        for window, first in windows:
            cache = model.make_cache(kv, **_turbo_options(kv, v, k_window, score_path))
            for b0 in range(0, len(window), batch):
                chunk = window[b0:b0 + batch]
                # scored: the predictions made at positions first .. len - 2 (of the next token)
                lo, hi = max(b0, first), min(b0 + len(chunk), len(window) - 1)
                if hi <= lo:  # nothing scored here: only the cache advances
                    model.forward(chunk, cache, embed_scale=float(scale))
                    mx.eval(*cache.state())
                    bar.update(len(chunk))
                    continue
                targets = window[lo + 1:hi + 1]
                n = len(targets)
                # The chunk's whole graph, evaluated once:
                logits = model.forward(chunk, cache, embed_scale=float(scale))[lo - b0:hi - b0]
                lp = log_softmax(logits)
                chunk_nll = -mx.take_along_axis(lp, mx.array(targets)[:, None], axis=-1)[:, 0]
                top1 = mx.argmax(logits, axis=-1)
                outputs = [chunk_nll, top1] + ([lp] if logprobs is not None else [])
                mx.eval(*outputs, *cache.state())
                sl = slice(row, row + n)
                nll[sl] = np.array(chunk_nll)
                argmax[sl] = np.array(top1)
                if logprobs is not None:
                    logprobs[sl] = np.array(lp)
                row += n
                bar.update(len(chunk))
    finally:
        if bar is not progress:  # a bar handed in is the caller's to close
            bar.close()
    seconds = time.perf_counter() - start

    from .cache import kv_label

    kl = None
    if reference is not None:
        kl = kl_divergence(reference.logprobs, logprobs)
    return PerplexityResult(
        ppl=math.exp(nll.mean()), nll=nll, tokens=total, n_scored=n_scored, kv=kv_label(cache),
        kv_bytes_per_token=cache.bytes_per_token, kv_bits=cache.bits_per_element,
        seconds=seconds, argmax=argmax, logprobs=logprobs if keep_logprobs else None, kl=kl,
        top1_agree=None if reference is None else float(np.mean(argmax == reference.argmax)),
        embed_scale=float(scale), scoring=scoring,
        extra={"backend": "mlx", "device": str(mx.default_device())},
    )
