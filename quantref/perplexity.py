"""Perplexity, per-token log-probabilities, and the KL divergence between two runs.

One causal pass over the text's tokens in windows of ``ctx`` tokens, each with a fresh cache,
fed to the model in batches of ``batch`` tokens. Which predictions are scored (``scoring=``):

- ``"all"`` (the default): the text is cut into windows of ``ctx`` tokens (default: one window
  over the whole text), BOS in front of each when the model's metadata asks for it
  (``tokenizer.ggml.add_bos_token``), and every token of a window after its first is scored
  (with BOS: every token). A trailing remainder shorter than a window is not scored from a
  window of its own, where its first tokens would have almost no context: its window is the
  text's last ``ctx`` tokens (overlapping the previous window), and only the remainder's tokens,
  all of them, are scored there. So no token is scored twice, and none with less context than
  the start of a full window gives it. This is how quant.cpp's ``--ppl`` and most
  "perplexity of a text" figures score, and what every table of this project uses.
- ``"llama.cpp"``: as llama.cpp's ``llama-perplexity`` scores (``tools/perplexity``,
  ``perplexity()``): the tokens (BOS first when the model adds it) are cut into ``len // ctx``
  full chunks of ``ctx`` (default 512, its ``-c``); the remainder is dropped; BOS is written
  over each chunk's first token when the model adds BOS; only the predictions made at positions
  ``ctx/2 .. ctx-2`` of each chunk are scored (``ctx - 1 - ctx/2`` tokens a chunk), and, as
  llama-perplexity refuses to run otherwise, the text needs at least ``2 * ctx`` tokens.

A run keeps, per scored token, its negative log-likelihood and the model's top-1 prediction;
with ``keep_logprobs=True`` also the whole log-probability row (``[n_scored, vocab]`` float32:
220 MB for the 1,116 tokens of ``ppl_1k.txt`` on a 49k vocabulary), so that KL divergence can be
computed between any two runs; with ``reference=`` a run measures its KL divergence from, and
top-1 agreement with, a reference run as it goes, keeping nothing large.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from .model import Model

__all__ = ["SCORINGS", "PerplexityResult", "default_text", "kl_divergence", "log_softmax",
           "logsumexp", "make_windows", "perplexity", "perturbation_scale", "progress_bar"]


@dataclass
class PerplexityResult:
    """What one perplexity run measured. Arrays are per scored token, in text order."""

    ppl: float
    nll: np.ndarray  # float64 [n_scored]: -log p(token | its past)
    tokens: int  # tokens evaluated (BOS included where it was added)
    n_scored: int
    kv: str  # KV-cache configuration label
    kv_bytes_per_token: float
    kv_bits: tuple[float, float]  # stored bits per K element, per V element
    seconds: float
    argmax: np.ndarray  # int32 [n_scored]: the model's top-1 prediction for each scored token
    logprobs: np.ndarray | None = None  # float32 [n_scored, vocab] when keep_logprobs
    kl: np.ndarray | None = None  # float64 [n_scored]: KL(reference || this run) when reference
    top1_agree: float | None = None  # fraction of scored tokens whose top-1 matches reference
    embed_scale: float = 1.0  # the perturbation this run was made under (1.0 = none)
    scoring: str = "all"  # which predictions were scored: see the module docstring
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def mean_kl(self) -> float | None:
        return None if self.kl is None else float(self.kl.mean())

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict of the scalar figures."""
        out = {
            "tokens": self.tokens,
            "n_scored": self.n_scored,
            "scoring": self.scoring,
            "ppl": self.ppl,
            "mean_nll": self.mean_nll,
            "kv": self.kv,
            "k_bits": self.kv_bits[0],
            "v_bits": self.kv_bits[1],
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "seconds": self.seconds,
            "tok_per_s": self.tok_per_s,
        }
        if self.kl is not None:
            out["mean_kl"] = self.mean_kl
            out["top1_agree"] = self.top1_agree
        if self.embed_scale != 1.0:
            out["embed_scale"] = self.embed_scale
        out.update(self.extra)
        return out


def logsumexp(logits: np.ndarray) -> np.ndarray:
    """``logits float32 [B, vocab]`` -> ``log(sum(exp(logits)))`` float64 ``[B]``.

    exp in float32, the sum in float64 (as llama.cpp's perplexity accumulates it).
    """
    peak = logits.max(axis=-1, keepdims=True)
    return np.log(np.exp(logits - peak).sum(axis=-1, dtype=np.float64)) + peak[:, 0]


def log_softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``logits float32 [B, vocab]`` -> (``log-probabilities float32 [B, vocab]``, ``lse [B]``)."""
    lse = logsumexp(logits)
    return (logits - lse[:, None]).astype(np.float32), lse


def kl_divergence(p_logprobs: np.ndarray, q_logprobs: np.ndarray) -> np.ndarray:
    """Per-row ``KL(p || q)`` in float64 for log-probability rows ``[n, vocab]`` -> ``[n]``."""
    p = np.asarray(p_logprobs, dtype=np.float64)
    q = np.asarray(q_logprobs, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"log-probability shapes differ: {p.shape} vs {q.shape}")
    return np.einsum("nv,nv->n", np.exp(p), p - q)


def default_text() -> str:
    """quantref's own English text, what ``quantref ppl`` scores when given no ``--text``:
    3,648 words of original prose in five registers, shipped in the package
    (``quantref/data/default_text.txt``; its README says what it is)."""
    from importlib import resources

    return resources.files("quantref").joinpath("data", "default_text.txt").read_text("utf-8")


def perturbation_scale(k: int) -> np.float32:
    """The embedding scale of perturbation ``k``: 1.0, then 1 +- 1 ulp, 1 +- 2 ulps, ...

    ``k = 0`` is exact; odd ``k`` step up, even ``k`` step down, ``(k + 1) // 2`` ulps of float32
    away from 1 (the float32 spacing is 2^-23 above 1 and 2^-24 below it).
    """
    one = np.float32(1.0)
    steps = (k + 1) // 2
    target = np.float32(np.inf) if k % 2 else np.float32(0.0)
    scale = one
    for _ in range(steps):
        scale = np.nextafter(scale, target, dtype=np.float32)
    return scale


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
    """Perplexity of ``model`` on ``text`` (or on token ``ids``) with a ``kv`` cache.

    ``ctx``: window length in tokens (BOS included); for ``scoring="all"`` default one window
    over the whole text, or windows of the model's context length when the text is longer; for
    ``scoring="llama.cpp"`` default 512. ``scoring``: ``"all"`` or ``"llama.cpp"``, which
    predictions are scored (see the module docstring). ``batch``: tokens per forward
    pass (a prefill chunk). ``perturb=k`` scales the token embeddings by
    :func:`perturbation_scale` ``(k)`` (a 1-ulp-scale change, to measure how chaotic a result
    is). ``reference``: a run with ``keep_logprobs=True`` to measure KL and top-1 agreement
    against. ``progress``: a tqdm bar of this run's tokens (default: on a terminal), or a bar
    to advance by them (the CLI's one bar over several runs).

    Raises ValueError for bad arguments: both or neither of ``text`` / ``ids``, an unknown
    ``scoring``, a ``ctx`` too small or beyond the model's context length, too few tokens.
    """
    windows = make_windows(model, text, ids, ctx, batch, scoring)
    n_scored = sum(len(w) - 1 - first for w, first in windows)
    check_reference(reference, n_scored)
    vocab = model.args.vocab_size
    nll = np.empty(n_scored, dtype=np.float64)
    argmax = np.empty(n_scored, dtype=np.int32)
    logprobs = np.empty((n_scored, vocab), dtype=np.float32) if keep_logprobs else None
    kl = np.empty(n_scored, dtype=np.float64) if reference is not None else None

    scale = perturbation_scale(perturb)
    cache = None
    total = sum(len(w) for w, _ in windows)
    bar = progress_bar(progress, total, f"ppl {kv}")
    start = time.perf_counter()
    row = 0
    try:
        for window, first in windows:
            cache = model.make_cache(kv, **_turbo_options(kv, v, k_window, score_path))
            for b0 in range(0, len(window), batch):
                chunk = window[b0:b0 + batch]
                logits = model.forward(chunk, cache, embed_scale=scale)
                # scored: the predictions made at positions first .. len - 2 (of the next token)
                lo, hi = max(b0, first), min(b0 + len(chunk), len(window) - 1)
                bar.update(len(chunk))
                if hi <= lo:
                    continue
                logits, targets = logits[lo - b0:hi - b0], window[lo + 1:hi + 1]
                lse = logsumexp(logits)
                n = len(targets)
                sl = slice(row, row + n)
                nll[sl] = lse - logits[np.arange(n), targets]
                argmax[sl] = logits.argmax(axis=-1)
                if logprobs is not None or reference is not None:
                    lp = (logits - lse[:, None]).astype(np.float32)
                    if logprobs is not None:
                        logprobs[sl] = lp
                    if reference is not None:
                        kl[sl] = kl_divergence(reference.logprobs[sl], lp)
                row += n
    finally:
        if bar is not progress:  # a bar handed in is the caller's to close
            bar.close()
    seconds = time.perf_counter() - start

    from .cache import kv_label

    result = PerplexityResult(
        ppl=math.exp(nll.mean()),
        nll=nll,
        tokens=total,
        n_scored=n_scored,
        kv=kv_label(cache),
        kv_bytes_per_token=cache.bytes_per_token,
        kv_bits=cache.bits_per_element,
        seconds=seconds,
        argmax=argmax,
        logprobs=logprobs,
        kl=kl,
        top1_agree=None if reference is None else float(np.mean(argmax == reference.argmax)),
        embed_scale=float(scale),
        scoring=scoring,
    )
    return result


SCORINGS = ("all", "llama.cpp")
LLAMA_CPP_CTX = 512  # llama-perplexity's default -c


def make_windows(model, text: str | None, ids: Sequence[int] | None, ctx: int | None,
                 batch: int, scoring: str = "all") -> list[tuple[list[int], int]]:
    """The windows a run evaluates, as ``(tokens, first)``: the predictions made at positions
    ``first .. len(tokens) - 2`` (of the token after each) are scored. Checks the arguments
    (ValueError naming the problem); shared by both halves. See the module docstring for the
    two ``scoring`` rules."""
    if (text is None) == (ids is None):
        raise ValueError("give exactly one of text= or ids=")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; one of: {', '.join(SCORINGS)}")
    tok = model.tokenizer
    add_bos = bool(getattr(tok, "add_bos", False)) if tok is not None else False
    bos = [tok.bos_id] if add_bos else []
    if ids is None:
        ids = tok.encode(text, add_special=False)
    ids = [int(i) for i in ids]
    limit = model.args.max_seq_len
    if scoring == "llama.cpp":
        n = LLAMA_CPP_CTX if ctx is None else ctx
        if n < 3:  # positions n/2 .. n-2 must hold one prediction at least
            raise ValueError(f"ctx must be at least 3 for llama.cpp scoring, got {n}")
        if n > limit:
            raise ValueError(f"ctx {n} exceeds the model's context length {limit}")
        tokens = bos + ids  # common_tokenize(..., add_special=true)
        if len(tokens) < 2 * n:
            raise ValueError(f"llama.cpp scoring needs at least 2 * ctx = {2 * n} tokens "
                             f"(llama-perplexity refuses fewer); the text has {len(tokens)}")
        return [(bos + tokens[i * n + len(bos):(i + 1) * n], n // 2)
                for i in range(len(tokens) // n)]
    if len(ids) + add_bos < 2:
        raise ValueError("the text has too few tokens to score (need at least 2)")
    if ctx is None:
        ctx = min(len(ids) + add_bos, limit)
    if ctx < 2 + add_bos:
        raise ValueError(f"ctx must be at least {2 + add_bos}, got {ctx}")
    if ctx > limit:
        raise ValueError(f"ctx {ctx} exceeds the model's context length {limit}")
    per_window = ctx - add_bos
    n_full = len(ids) // per_window
    windows = [(bos + ids[i * per_window:(i + 1) * per_window], 0) for i in range(n_full)]
    rest = len(ids) - n_full * per_window
    if rest and n_full:  # the text's last ctx tokens; only the remainder's are scored
        tail = bos + ids[len(ids) - per_window:]
        windows.append((tail, len(tail) - 1 - rest))
    elif rest and len(bos) + rest >= 2:  # the whole text is shorter than a window
        windows.append((bos + ids, 0))
    return windows


def check_reference(reference: PerplexityResult | None, n_scored: int) -> None:
    """A reference run must have kept its log-probabilities and scored the same tokens."""
    if reference is None:
        return
    if reference.logprobs is None:
        raise ValueError("the reference run must be made with keep_logprobs=True")
    if reference.n_scored != n_scored:
        raise ValueError(f"reference scored {reference.n_scored} tokens, this run {n_scored}")


def _turbo_options(kv: str, v: str | None, k_window: int, score_path: str) -> dict[str, Any]:
    if kv.startswith("turbo_kv_"):
        return {"v": v, "k_window": k_window, "score_path": score_path}
    if v is not None or k_window or score_path != "int8_codebook":
        raise ValueError(f"v=, k_window= and score_path= apply to turbo_kv K types, not {kv!r}")
    return {}


def progress_bar(progress: "bool | None | tqdm", total: int, desc: str) -> tqdm:
    """The bar a run advances by its tokens: ``progress`` itself when it is a bar (something
    with ``update``), else a new one of ``total`` tokens, shown when ``progress`` is true, or
    for ``None`` on a terminal."""
    if hasattr(progress, "update"):
        return progress
    return tqdm(total=total, unit="tok", desc=desc, disable=not _show(progress), leave=False)


def _show(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    import sys

    return sys.stderr.isatty()
