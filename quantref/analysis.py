"""How much a compressed KV cache changes attention: per layer and per head, for researchers.

The comparison isolates the cache. :func:`capture` runs the model **once** with a float32 cache
and keeps, per layer, exactly what the model handed that cache: the post-RoPE keys, the values
and the (post-RoPE) queries. :func:`measure` then feeds the same keys and values into a fresh
cache of the type under test and reads them back through the cache's own interface
(``keys``, ``values``, ``scores``), so turbo_kv score paths, ``k_window`` and query quantization
are measured exactly as the model would see them, with no drift from earlier layers mixed in.

Definitions (``T`` captured tokens at positions ``0 .. T-1``, ``k_t`` the float32 key of
position ``t`` and ``k^_t`` the key the cache decodes; the same for values):

- key relative MSE, per layer and KV head: ``sum_t |k^_t - k_t|^2 / sum_t |k_t|^2``;
- key cosine similarity: the mean over ``t`` of ``cos(k^_t, k_t)`` (1 where both are zero);
- value relative MSE and cosine: the same for values;
- score relative RMS error, per layer and query head (and pooled per KV head):
  ``sqrt(sum (s^ - s)^2 / sum s^2)`` over the causal entries ``(t, j <= t)``, where ``s`` are the
  reference scores ``q_t . k_j`` and ``s^`` the compressed cache's (unscaled, pre-softmax);
- attention KL, per layer and query head: ``KL(softmax(s / sqrt(d)) || softmax(s^ / sqrt(d)))``
  of each query's causal row, averaged over the ``T`` query positions (nats);
- attention output relative RMS error, per layer and query head: ``sqrt(sum |o^_t - o_t|^2 /
  sum |o_t|^2)`` of the attention outputs ``o = softmax(s / sqrt(d)) V`` (before ``wo``), where
  ``o^`` uses the compressed scores *and* the decoded values: K and V error together.

The reference scores are those of a float32 cache (what the model computes at ``kv="fp32"``),
so an fp32 cache measures exactly zero everywhere. Sums are float64.

Besides, :func:`bits_vs_quality` runs :func:`quantref.perplexity` for several cache types
against a float32 reference (PPL, KL, top-1 agreement against bits per element), and
:func:`kv_memory` / :func:`memory_per_token` / :func:`memory_table` give the cache's true size at
a context length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from .cache import KVCache, kv_label, make_cache

if TYPE_CHECKING:
    from .model import Model, ModelArgs
    from .perplexity import PerplexityResult

__all__ = [
    "DEFAULT_CONFIGS",
    "CacheErrors",
    "Capture",
    "bits_vs_quality",
    "capture",
    "cache_config",
    "kv_memory",
    "measure",
    "measure_many",
    "memory_per_token",
    "memory_table",
]

# Every cache type, plus turbo_kv_4b with q4 values: the set the notebook plots.
DEFAULT_CONFIGS: tuple[str | dict[str, Any], ...] = (
    "fp16", "q8_0", "q4_0", "mlx_q8", "mlx_q4",
    "turbo_kv_3b", "turbo_kv_4b", "turbo_kv_5b", {"kv": "turbo_kv_4b", "v": "q4"},
)

_CONFIG_KEYS = ("kv", "v", "k_window", "score_path")


def cache_config(config: str | Mapping[str, Any]) -> dict[str, Any]:
    """A cache configuration as keyword arguments of :func:`quantref.cache.make_cache`.

    ``config`` is a kv type (``"q8_0"``) or a mapping with ``kv`` and optionally ``v``,
    ``k_window``, ``score_path``; returns ``{"kv": ..., **options}`` with only the options given.
    """
    if isinstance(config, str):
        return {"kv": config}
    if not isinstance(config, Mapping) or "kv" not in config:
        raise ValueError(f"a cache configuration is a kv type or a mapping with 'kv', got "
                         f"{config!r}")
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown cache option(s) {unknown} in {dict(config)!r}; "
                         f"allowed: {', '.join(_CONFIG_KEYS)}")
    return dict(config)


# ---------------------------------------------------------------------------------------------
# Capture: one float32 pass, recording what the model hands its cache
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Capture:
    """What the model handed its float32 cache over one causal pass of ``T`` tokens.

    Query head ``j`` of a layer belongs to KV head ``j // n_groups`` and is
    ``queries[layer, j // n_groups, j % n_groups]``, as the model groups them.
    """

    keys: np.ndarray  # float32 [n_layers, n_kv_heads, T, head_dim], after RoPE
    values: np.ndarray  # float32 [n_layers, n_kv_heads, T, head_dim]
    queries: np.ndarray  # float32 [n_layers, n_kv_heads, n_groups, T, head_dim], after RoPE
    ids: np.ndarray | None = None  # int64 [T]: the tokens, when captured from a model

    def __post_init__(self) -> None:
        k, v, q = self.keys, self.values, self.queries
        for name, a, ndim in (("keys", k, 4), ("values", v, 4), ("queries", q, 5)):
            if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != ndim:
                raise ValueError(f"Capture.{name} must be a float32 array of {ndim} dims, got "
                                 f"{getattr(a, 'dtype', type(a).__name__)} "
                                 f"{getattr(a, 'shape', '')}")
            if not np.isfinite(a).all():
                raise ValueError(f"Capture.{name} holds non-finite values")
        if v.shape != k.shape:
            raise ValueError(f"Capture.values has shape {v.shape}, keys {k.shape}")
        L, H, T, d = k.shape
        if q.shape[:2] != (L, H) or q.shape[3:] != (T, d):
            raise ValueError(f"Capture.queries has shape {q.shape}; keys {k.shape} need "
                             f"[{L}, {H}, n_groups, {T}, {d}]")
        if min(k.shape) < 1 or q.shape[2] < 1:
            raise ValueError(f"Capture arrays must not be empty: keys {k.shape}, "
                             f"queries {q.shape}")
        if self.ids is not None and np.shape(self.ids) != (T,):
            raise ValueError(f"Capture.ids has shape {np.shape(self.ids)}, expected ({T},)")

    @property
    def n_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def n_groups(self) -> int:
        return self.queries.shape[2]

    @property
    def n_heads(self) -> int:
        return self.n_kv_heads * self.n_groups

    @property
    def n_tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[3]


class _RecordingCache:
    """A float32 KV cache that keeps a copy of what the model hands it, layer by layer.

    Every attribute the model uses (``length``, ``values``, ``commit``) is the wrapped cache's;
    ``append`` also records K and V, ``scores`` also records the queries.
    """

    def __init__(self, inner: KVCache):
        self._inner = inner
        n = inner.n_layers
        self.k: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.v: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.q: list[list[np.ndarray]] = [[] for _ in range(n)]

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        self.k[layer].append(np.array(k, np.float32))  # [n_kv_heads, T, head_dim]
        self.v[layer].append(np.array(v, np.float32))
        self._inner.append(layer, k, v)

    def scores(self, layer: int, q: np.ndarray) -> np.ndarray:
        self.q[layer].append(np.array(q, np.float32))  # [n_kv_heads, n_groups, T, head_dim]
        return self._inner.scores(layer, q)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def capture(model: "Model", text: str | None = None, *, ids: Sequence[int] | None = None,
            max_tokens: int | None = None, batch: int = 256) -> Capture:
    """Run ``model`` once over ``text`` (or token ``ids``) with a float32 cache; record per layer.

    ``text`` is tokenized as :func:`quantref.perplexity` does (BOS in front when the metadata
    asks for it); ``ids`` are taken as they are. ``max_tokens`` keeps the first tokens only
    (BOS included). The pass is fed in chunks of ``batch`` tokens, as a prefill would be.
    Returns a :class:`Capture` of ``T = min(len, max_tokens)`` tokens.
    """
    if (text is None) == (ids is None):
        raise ValueError("give exactly one of text= or ids=")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if ids is None:
        tok = model.tokenizer
        if tok is None:
            raise ValueError("the model has no tokenizer: pass ids=")
        ids = ([tok.bos_id] if getattr(tok, "add_bos", False) else []) \
            + list(tok.encode(text, add_special=False))
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        ids = ids[:max_tokens]
    if ids.size == 0:
        raise ValueError("nothing to capture: the text has no tokens")
    if ids.size > model.args.max_seq_len:
        raise ValueError(f"{ids.size} tokens exceed the model's context length "
                         f"{model.args.max_seq_len}; pass max_tokens=")

    rec = _RecordingCache(model.make_cache("fp32"))
    for b0 in range(0, ids.size, batch):
        model.forward(ids[b0:b0 + batch], rec, last_only=True)  # logits are not needed
    return Capture(
        keys=np.stack([np.concatenate(k, axis=1) for k in rec.k]),
        values=np.stack([np.concatenate(v, axis=1) for v in rec.v]),
        queries=np.stack([np.concatenate(q, axis=2) for q in rec.q]),
        ids=ids,
    )


# ---------------------------------------------------------------------------------------------
# Measure: the captured K/V through a cache of each type
# ---------------------------------------------------------------------------------------------

@dataclass
class CacheErrors:
    """Per layer and head error figures of one cache configuration (definitions: module doc).

    Arrays ``[n_layers, n_kv_heads]`` are per KV head; ``[n_layers, n_heads]`` per query head
    (query head ``j`` reads KV head ``j // n_groups``). The ``*_kv`` score and output errors
    pool the sums of a KV head's query heads; ``attn_kl_kv`` is their mean.
    """

    kv: str  # cache configuration label, e.g. "turbo_kv_4b/v=q4"
    n_tokens: int
    k_bits: float  # stored bits per K element
    v_bits: float  # stored bits per V element
    bytes_per_token: float  # cache bytes one token adds (all layers, K and V)
    key_rel_mse: np.ndarray  # float64 [n_layers, n_kv_heads]
    key_cos: np.ndarray  # float64 [n_layers, n_kv_heads]
    value_rel_mse: np.ndarray  # float64 [n_layers, n_kv_heads]
    value_cos: np.ndarray  # float64 [n_layers, n_kv_heads]
    score_rel_rms: np.ndarray  # float64 [n_layers, n_heads]
    score_rel_rms_kv: np.ndarray  # float64 [n_layers, n_kv_heads]
    attn_kl: np.ndarray  # float64 [n_layers, n_heads], nats, mean over query positions
    attn_kl_kv: np.ndarray  # float64 [n_layers, n_kv_heads]
    output_rel_rms: np.ndarray  # float64 [n_layers, n_heads]
    output_rel_rms_kv: np.ndarray  # float64 [n_layers, n_kv_heads]
    options: dict[str, Any] = field(default_factory=dict)  # the make_cache arguments

    KV_HEAD_FIELDS = ("key_rel_mse", "key_cos", "value_rel_mse", "value_cos",
                      "score_rel_rms_kv", "attn_kl_kv", "output_rel_rms_kv")
    HEAD_FIELDS = ("score_rel_rms", "attn_kl", "output_rel_rms")

    @property
    def n_layers(self) -> int:
        return self.key_rel_mse.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.key_rel_mse.shape[1]

    @property
    def n_heads(self) -> int:
        return self.attn_kl.shape[1]

    def summary(self) -> dict[str, Any]:
        """Scalars: the configuration, sizes, and each figure's mean over layers and heads."""
        out: dict[str, Any] = {"kv": self.kv, "n_tokens": self.n_tokens, "k_bits": self.k_bits,
                               "v_bits": self.v_bits, "bytes_per_token": self.bytes_per_token}
        for name in self.KV_HEAD_FIELDS + self.HEAD_FIELDS:
            if name.endswith("_kv") and name[:-3] in self.HEAD_FIELDS:
                continue  # the per-query-head mean says it (and pooled sums would mislead)
            out[name] = float(getattr(self, name).mean())
        return out

    def to_rows(self, by: str = "kv_head") -> list[dict[str, Any]]:
        """Tidy rows, one per (layer, KV head) (``by="kv_head"``) or (layer, query head)
        (``by="head"``), each with ``kv``, ``layer``, ``kv_head`` (and ``head``) and the figures
        at that granularity (``*_kv`` names lose their suffix)."""
        if by == "kv_head":
            names, shape = self.KV_HEAD_FIELDS, (self.n_layers, self.n_kv_heads)
        elif by == "head":
            names, shape = self.HEAD_FIELDS, (self.n_layers, self.n_heads)
        else:
            raise ValueError(f"by must be 'kv_head' or 'head', got {by!r}")
        n_groups = self.n_heads // self.n_kv_heads
        layer, head = (a.ravel() for a in np.indices(shape))
        columns = {n.removesuffix("_kv"): getattr(self, n).ravel().tolist() for n in names}
        rows = []
        for i, (l, h) in enumerate(zip(layer.tolist(), head.tolist())):
            row: dict[str, Any] = {"kv": self.kv, "layer": l}
            if by == "head":
                row["head"] = h
                row["kv_head"] = h // n_groups
            else:
                row["kv_head"] = h
            row.update({n: col[i] for n, col in columns.items()})
            rows.append(row)
        return rows


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with ``0 / 0 = 0`` (nothing to get wrong) and ``x / 0 = inf`` for x > 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0),
                        np.where(num > 0, np.inf, 0.0))


def _recon(x: np.ndarray, x_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relative MSE and mean cosine per head of ``x, x_hat float32 [H, T, d]`` -> 2 x ``[H]``."""
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    rel_mse = _ratio(((x_hat - x) ** 2).sum(axis=(1, 2)), (x * x).sum(axis=(1, 2)))
    dot = np.einsum("htd,htd->ht", x, x_hat)
    norms = np.sqrt(np.einsum("htd,htd->ht", x, x) * np.einsum("htd,htd->ht", x_hat, x_hat))
    both_zero = ~(x.any(axis=2) | x_hat.any(axis=2))
    cos = np.where(both_zero, 1.0, _ratio(dot, norms))  # a zero vector vs a non-zero one: 0
    return rel_mse, cos.mean(axis=1)


def _causal_softmax(x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of the rows of ``x float64 [..., T, T]`` over their causal entries.

    ``mask [T, T]`` is 0 on and below the diagonal, -inf above. Returns the probabilities
    ``[..., T, T]`` (0 above the diagonal) and each row's log-sum-exp ``[..., T]``.
    """
    p = x + mask
    peak = p.max(axis=-1, keepdims=True)  # the diagonal is always visible: finite
    p -= peak
    np.exp(p, out=p)
    total = p.sum(axis=-1, keepdims=True)
    p /= total
    return p, (peak + np.log(total))[..., 0]


def _masked_sq_sum(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``sum x^2`` over the entries where ``keep [T, T]`` is 1, of ``x [n, g, T, T]`` -> ``[n, g]``
    (``x`` is overwritten)."""
    x *= keep
    return np.einsum("hgij,hgij->hg", x, x)


def _layer_errors(k: np.ndarray, v: np.ndarray, k_hat: np.ndarray, v_hat: np.ndarray,
                  s_ref: np.ndarray, s_hat: np.ndarray) -> dict[str, np.ndarray]:
    """The figures of one layer.

    ``k, v, k_hat, v_hat float32 [n_kv_heads, T, d]``; ``s_ref, s_hat float32
    [n_kv_heads, n_groups, T, T]`` unscaled scores -> dict of ``[n_kv_heads]`` and
    ``[n_kv_heads, n_groups]`` float64 arrays.
    """
    T, d = k.shape[1:]
    out: dict[str, np.ndarray] = {}
    out["key_rel_mse"], out["key_cos"] = _recon(k, k_hat)
    out["value_rel_mse"], out["value_cos"] = _recon(v, v_hat)

    keep = np.tril(np.ones((T, T)))  # the causal entries (t, j <= t)
    mask = np.where(keep > 0, 0.0, -np.inf)
    score_num = _masked_sq_sum(np.subtract(s_hat, s_ref, dtype=np.float64), keep)
    score_den = _masked_sq_sum(s_ref.astype(np.float64), keep)

    # As the model does, scale the float32 scores by float32(1/sqrt(d)) before the softmax.
    scale = np.float32(1.0 / math.sqrt(d))
    a, b = (s_ref * scale).astype(np.float64), (s_hat * scale).astype(np.float64)
    p, lse_a = _causal_softmax(a, mask)
    q, lse_b = _causal_softmax(b, mask)
    # KL(p || q) = sum_j p_j (log p_j - log q_j) = sum_j p_j (a_j - b_j) - (lse_a - lse_b):
    # p_j = 0 above the diagonal, where a and b are finite, so those entries add nothing.
    a -= b
    kl_rows = np.einsum("hgij,hgij->hgi", p, a) - (lse_a - lse_b)  # [n_kv, G, T]
    out["attn_kl"] = kl_rows.mean(axis=-1)

    o_ref = p @ v.astype(np.float64)[:, None]  # [n_kv, G, T, d]
    o_hat = q @ v_hat.astype(np.float64)[:, None]
    out_den = np.einsum("hgtd,hgtd->hg", o_ref, o_ref)
    o_hat -= o_ref
    out_num = np.einsum("hgtd,hgtd->hg", o_hat, o_hat)

    out["score_rel_rms"] = np.sqrt(_ratio(score_num, score_den))
    out["score_rel_rms_kv"] = np.sqrt(_ratio(score_num.sum(1), score_den.sum(1)))
    out["attn_kl_kv"] = out["attn_kl"].mean(axis=1)
    out["output_rel_rms"] = np.sqrt(_ratio(out_num, out_den))
    out["output_rel_rms_kv"] = np.sqrt(_ratio(out_num.sum(1), out_den.sum(1)))
    return out


def measure(cap: Capture, kv: str = "fp32", **options: Any) -> CacheErrors:
    """The error figures of cache type ``kv`` (with ``make_cache`` ``options``: ``v``,
    ``k_window``, ``score_path``) on the captured keys, values and queries.

    All ``T`` tokens go into a fresh cache as one chunk and every query asks for its scores, as
    a prefill of the whole capture would; the reference is a float32 cache fed the same way.
    Returns a :class:`CacheErrors` with arrays ``[n_layers, n_kv_heads]`` / ``[n_layers,
    n_heads]``.
    """
    dims = dict(n_layers=cap.n_layers, n_kv_heads=cap.n_kv_heads, head_dim=cap.head_dim)
    cache = make_cache(kv, **dims, **options)
    reference = make_cache("fp32", **dims)
    per_layer = []
    for layer in range(cap.n_layers):
        for c in (cache, reference):
            c.append(layer, cap.keys[layer], cap.values[layer])
        q = cap.queries[layer]
        per_layer.append(_layer_errors(
            cap.keys[layer], cap.values[layer], cache.keys(layer), cache.values(layer),
            reference.scores(layer, q), cache.scores(layer, q)))

    def stack(name: str) -> np.ndarray:
        a = np.stack([f[name] for f in per_layer])
        return a.reshape(cap.n_layers, -1)  # [n_kv, G] per layer -> query heads kv * G + g

    k_bits, v_bits = cache.bits_per_element
    return CacheErrors(
        kv=kv_label(cache), n_tokens=cap.n_tokens, k_bits=k_bits, v_bits=v_bits,
        bytes_per_token=cache.bytes_per_token,
        **{name: stack(name) for name in CacheErrors.KV_HEAD_FIELDS + CacheErrors.HEAD_FIELDS},
        options={"kv": kv, **options},
    )


def measure_many(cap: Capture, configs: Iterable[str | Mapping[str, Any]]) -> list[CacheErrors]:
    """:func:`measure` for each configuration (a kv type or a mapping, see :func:`cache_config`)."""
    return [measure(cap, **cache_config(c)) for c in configs]


# ---------------------------------------------------------------------------------------------
# Quality against bits: perplexity runs
# ---------------------------------------------------------------------------------------------

def bits_vs_quality(model: "Model", text: str | None = None, *,
                    ids: Sequence[int] | None = None,
                    configs: Iterable[str | Mapping[str, Any]] = DEFAULT_CONFIGS,
                    ctx: int | None = None, batch: int = 256,
                    reference: "PerplexityResult | None" = None,
                    perturb: int = 1,
                    progress: bool | None = False) -> list[dict[str, Any]]:
    """Perplexity, KL and top-1 agreement of each cache configuration against float32.

    Runs :func:`quantref.perplexity` once with an fp32 cache (``keep_logprobs``; or uses
    ``reference``, such a run on the same tokens) and once per configuration against it.
    Returns one row per configuration, the fp32 reference first: ``kv`` (label), ``k_bits``,
    ``v_bits``, ``bits`` (their mean: stored bits per cached element), ``bytes_per_token``,
    ``ppl``, ``ppl_ratio`` (to fp32), ``mean_kl`` (nats per token), ``top1_agree``,
    ``seconds``: the exact (unperturbed) run's.

    ``perturb=N`` (N >= 1) runs every configuration, fp32 too, N times, the k-th with the token
    embeddings scaled by ``perplexity``'s ``perturb=k`` (1 +- ceil(k/2) ulps; ``quantref ppl
    --perturb``'s runs), and adds the spread of those runs: ``ppl_min``, ``ppl_max`` and
    ``kl_min``, ``kl_max`` (the mean KL of each run from the exact fp32 run's distribution).
    A compressed cache is chaotic under such 1-ulp changes (codebook indices near a decision
    boundary flip), so the spread is the resolution a single run's figure has.
    Raises ``ValueError`` for ``perturb < 1`` or a ``reference`` without log-probabilities.
    """
    from .perplexity import perplexity

    if perturb < 1:
        raise ValueError(f"perturb must be >= 1, got {perturb}")
    args = dict(text=text, ids=ids, ctx=ctx, batch=batch, progress=progress)
    if reference is None:
        reference = perplexity(model, kv="fp32", keep_logprobs=True, **args)
    elif reference.logprobs is None:
        raise ValueError("the reference run must be made with keep_logprobs=True")

    def row(runs: "list[PerplexityResult]", mean_kl: list[float],
            top1: float) -> dict[str, Any]:
        r = runs[0]
        ppls = [x.ppl for x in runs]
        return {"kv": r.kv, "k_bits": r.kv_bits[0], "v_bits": r.kv_bits[1],
                "bits": (r.kv_bits[0] + r.kv_bits[1]) / 2, "bytes_per_token":
                r.kv_bytes_per_token, "ppl": r.ppl, "ppl_ratio": r.ppl / reference.ppl,
                "mean_kl": mean_kl[0], "top1_agree": top1, "seconds": r.seconds,
                "ppl_min": min(ppls), "ppl_max": max(ppls),
                "kl_min": min(mean_kl), "kl_max": max(mean_kl)}

    def perturbed(c: dict[str, Any]) -> "list[PerplexityResult]":
        return [perplexity(model, reference=reference, perturb=k, **c, **args)
                for k in range(1, perturb)]

    fp32_runs = perturbed({"kv": "fp32"})
    rows = [row([reference, *fp32_runs], [0.0] + [r.mean_kl for r in fp32_runs], 1.0)]
    for config in configs:
        c = cache_config(config)
        runs = [perplexity(model, reference=reference, **c, **args), *perturbed(c)]
        rows.append(row(runs, [r.mean_kl for r in runs], runs[0].top1_agree))
    return rows


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------

def _empty_cache(args: "ModelArgs | Model", kv: str, options: Mapping[str, Any]) -> KVCache:
    a = getattr(args, "args", args)  # a Model or its ModelArgs
    return make_cache(kv, n_layers=a.n_layers, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim,
                      **options)


def memory_per_token(args: "ModelArgs | Model", kv: str = "fp32", **options: Any) -> float:
    """Bytes one token adds to a ``kv`` cache of this model (all layers, K and V)."""
    return _empty_cache(args, kv, options).bytes_per_token


def kv_memory(args: "ModelArgs | Model", kv: str, context: int, **options: Any) -> int:
    """Bytes a ``kv`` cache (``make_cache`` ``options``) holds after ``context`` tokens.

    The cache types' true sizes: per-token bytes times ``context``, plus the float32 keys of a
    turbo ``k_window`` (at most W tokens); equals ``KVCache.nbytes`` of a filled cache.
    """
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    cache = _empty_cache(args, kv, options)
    a = getattr(args, "args", args)
    window = a.n_layers * a.n_kv_heads * min(context, cache.k_window) * a.head_dim * 4
    return round(cache.bytes_per_token * context) + window


def memory_table(args: "ModelArgs | Model",
                 configs: Iterable[str | Mapping[str, Any]] = ("fp32", *DEFAULT_CONFIGS),
                 contexts: Sequence[int] = (4096, 32768)) -> list[dict[str, Any]]:
    """One row per configuration: ``kv`` label, ``k_bits``, ``v_bits``, ``bytes_per_token`` and
    ``bytes_at_<n>`` for each context length ``n`` (the model's own limit is not applied)."""
    rows = []
    for config in configs:
        c = cache_config(config)
        kv, options = c.pop("kv"), c
        cache = _empty_cache(args, kv, options)
        row: dict[str, Any] = {"kv": kv_label(cache), "k_bits": cache.k_codec.bits,
                               "v_bits": cache.v_codec.bits,
                               "bytes_per_token": cache.bytes_per_token}
        for n in contexts:
            row[f"bytes_at_{n}"] = kv_memory(args, kv, n, **options)
        rows.append(row)
    return rows
