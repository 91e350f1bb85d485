"""The Llama-family forward pass in NumPy: the readable oracle.

A token's whole journey is in :meth:`Model.forward`, top to bottom, in the manner of llama2.c
and picoGPT: embedding, then per layer RMSNorm -> attention (RoPE, GQA, causal softmax against
the KV cache) -> residual -> RMSNorm -> SwiGLU feed-forward -> residual, then the final norm and
the output projection. All arithmetic is float32; weights are dequantized to float32 once, at
load. How keys and values are *stored* is the KV cache's business (:mod:`quantref.cache`), so
compressed caches plug in without touching this file.

Shapes use ``T`` for the tokens of the current chunk, ``L`` for the tokens in the cache (old and
new), ``dim`` for the model width, ``head_dim`` for one head.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from . import gguf
from .cache import KVCache, make_cache

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "LayerWeights",
    "Model",
    "ModelArgs",
    "UnsupportedModelError",
    "Weights",
    "load",
    "rms_norm",
    "rope",
    "rope_tables",
    "causal_mask",
    "softmax",
    "swiglu",
]

SUPPORTED_ARCHITECTURES = ("llama",)


class UnsupportedModelError(ValueError):
    """The file is a valid GGUF but not a model this engine runs (architecture, options)."""


@dataclass(frozen=True)
class ModelArgs:
    """Hyperparameters of a Llama-family model, read from GGUF metadata."""

    vocab_size: int
    dim: int  # llama.embedding_length
    n_layers: int  # llama.block_count
    n_heads: int  # llama.attention.head_count
    n_kv_heads: int  # llama.attention.head_count_kv (GQA when < n_heads)
    head_dim: int  # llama.attention.key_length, else dim // n_heads
    hidden_dim: int  # llama.feed_forward_length
    norm_eps: float  # llama.attention.layer_norm_rms_epsilon
    rope_base: float  # llama.rope.freq_base
    rope_dim: int  # llama.rope.dimension_count: leading dims of a head that RoPE rotates
    rope_scale: float  # positions are divided by this (llama.rope.scaling.type = linear)
    max_seq_len: int  # llama.context_length
    tied_embeddings: bool  # no output.weight: the output projection is token_embd

    @property
    def n_groups(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], tensor_names: Sequence[str] = (),
                      path: str | Path = "<metadata>") -> "ModelArgs":
        arch = md.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{path}: general.architecture = {arch!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def get(key: str, default: Any = None) -> Any:
            value = md.get(f"{arch}.{key}", default)
            if value is None:
                raise UnsupportedModelError(f"{path}: metadata key {arch}.{key} is missing")
            return value

        dim = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        n_kv_heads = int(get("attention.head_count_kv", n_heads))
        head_dim = int(get("attention.key_length", dim // n_heads if n_heads else 0))
        if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise UnsupportedModelError(
                f"{path}: head_count {n_heads} is not a positive multiple of head_count_kv "
                f"{n_kv_heads}")
        if int(get("attention.value_length", head_dim)) != head_dim or head_dim % 2:
            raise UnsupportedModelError(f"{path}: key/value head sizes differ or are odd")
        scaling = md.get(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise UnsupportedModelError(
                f"{path}: {arch}.rope.scaling.type = {scaling!r} is not supported "
                "(none, linear; Llama 3.1+ frequency factors come from rope_freqs.weight)")
        rope_scale = float(md.get(f"{arch}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
        vocab = md.get(f"{arch}.vocab_size")
        if vocab is None:
            vocab = len(md.get("tokenizer.ggml.tokens", ()))
        return cls(
            vocab_size=int(vocab),
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            hidden_dim=int(get("feed_forward_length")),
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rope_dim=int(get("rope.dimension_count", head_dim)),
            rope_scale=rope_scale,
            max_seq_len=int(get("context_length")),
            tied_embeddings="output.weight" not in tensor_names,
        )

    def kv_bytes_per_token(self, bytes_per_element: float = 4.0) -> float:
        """KV-cache bytes one token costs across all layers (K and V) at a given element size."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_element


@dataclass
class LayerWeights:
    """One transformer block. Linear weights are ``[out_features, in_features]``."""

    attn_norm: np.ndarray  # [dim]
    wq: np.ndarray  # [n_heads * head_dim, dim]
    wk: np.ndarray  # [n_kv_heads * head_dim, dim]
    wv: np.ndarray  # [n_kv_heads * head_dim, dim]
    wo: np.ndarray  # [dim, n_heads * head_dim]
    ffn_norm: np.ndarray  # [dim]
    w_gate: np.ndarray  # [hidden_dim, dim]
    w_up: np.ndarray  # [hidden_dim, dim]
    w_down: np.ndarray  # [dim, hidden_dim]


@dataclass
class Weights:
    """All of a model's weights, float32."""

    token_embd: np.ndarray  # [vocab, dim]
    layers: list[LayerWeights]
    output_norm: np.ndarray  # [dim]
    output: np.ndarray  # [vocab, dim]; the same array as token_embd when tied
    rope_freqs: np.ndarray | None = None  # [rope_dim // 2] frequency divisors (Llama 3.1+)

    @property
    def n_params(self) -> int:
        arrays = [self.token_embd, self.output_norm]
        if self.output is not self.token_embd:
            arrays.append(self.output)
        for lw in self.layers:
            arrays.extend(vars(lw).values())
        return sum(a.size for a in arrays)


def load_weights(gf: gguf.GGUFFile, args: ModelArgs) -> Weights:
    """Dequantize every tensor of a llama GGUF to float32, checking each shape against ``args``."""

    def tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in gf.tensors:
            raise UnsupportedModelError(f"{gf.path}: tensor {name!r} is missing")
        if tuple(gf.tensors[name].shape) != shape:
            raise UnsupportedModelError(
                f"{gf.path}: tensor {name!r} has shape {tuple(gf.tensors[name].shape)}, "
                f"expected {shape} from the metadata")
        return np.ascontiguousarray(gf.tensor(name), dtype=np.float32)

    def linear(name: str, shape: tuple[int, int]) -> np.ndarray:
        # [out, in] as everywhere, but laid out column-major, so that x @ W.T hands BLAS a
        # contiguous [in, out] operand (a few percent faster than a transposed one).
        return np.asfortranarray(tensor(name, shape))

    a = args
    q_dim, kv_dim = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    layers = []
    for i in range(a.n_layers):
        b = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=tensor(b + "attn_norm.weight", (a.dim,)),
            wq=linear(b + "attn_q.weight", (q_dim, a.dim)),
            wk=linear(b + "attn_k.weight", (kv_dim, a.dim)),
            wv=linear(b + "attn_v.weight", (kv_dim, a.dim)),
            wo=linear(b + "attn_output.weight", (a.dim, q_dim)),
            ffn_norm=tensor(b + "ffn_norm.weight", (a.dim,)),
            w_gate=linear(b + "ffn_gate.weight", (a.hidden_dim, a.dim)),
            w_up=linear(b + "ffn_up.weight", (a.hidden_dim, a.dim)),
            w_down=linear(b + "ffn_down.weight", (a.dim, a.hidden_dim)),
        ))
    token_embd = tensor("token_embd.weight", (a.vocab_size, a.dim))
    output = token_embd if a.tied_embeddings else tensor("output.weight", (a.vocab_size, a.dim))
    rope_freqs = (tensor("rope_freqs.weight", (a.rope_dim // 2,))
                  if "rope_freqs.weight" in gf.tensors else None)
    return Weights(token_embd=token_embd, layers=layers,
                   output_norm=tensor("output_norm.weight", (a.dim,)),
                   output=output, rope_freqs=rope_freqs)


# ---------------------------------------------------------------------------------------------
# The building blocks. Each is a few lines of NumPy and is what quantref_mlx mirrors name for name.
# ---------------------------------------------------------------------------------------------

def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``x [T, dim] -> [T, dim]``: x / sqrt(mean(x^2) + eps) * weight.

    The mean of squares is accumulated in float64, as ggml does, then the scale is float32.
    """
    mean_sq = np.einsum("td,td->t", x, x, dtype=np.float64) / x.shape[-1]
    scale = (1.0 / np.sqrt(mean_sq + eps)).astype(np.float32)
    return (x * scale[:, None]) * weight


def rope_tables(positions: np.ndarray, args: ModelArgs,
                rope_freqs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``[T, rope_dim // 2]`` float32 for absolute ``positions [T]``.

    Pair ``i`` turns by ``pos / scale * base^(-2i / rope_dim) / freq_factor[i]``; the angles are
    computed in float64 and rounded once (llama.cpp accumulates them in float32, which differs
    in the last bits only).
    """
    half = args.rope_dim // 2
    inv_freq = args.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / args.rope_dim)
    if rope_freqs is not None:
        inv_freq = inv_freq / rope_freqs.astype(np.float64)
    angles = (np.asarray(positions, dtype=np.float64) / args.rope_scale)[:, None] * inv_freq
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate adjacent pairs ``(x[2i], x[2i+1])`` of each head: ``x [T, heads, head_dim]``.

    GGUF Llama weights are stored with Q and K rows permuted for this adjacent-pair ("normal")
    form of RoPE, so it is the form to use here (not the half-split form of HF checkpoints).
    Only the first ``2 * cos.shape[1]`` dims of a head turn; the rest pass through.
    """
    n = 2 * cos.shape[-1]
    even, odd = x[..., 0:n:2], x[..., 1:n:2]
    c, s = cos[:, None, :], sin[:, None, :]
    out = x.copy()
    out[..., 0:n:2] = even * c - odd * s
    out[..., 1:n:2] = even * s + odd * c
    return out


@functools.lru_cache(maxsize=8)
def causal_mask(T: int) -> np.ndarray:
    """``float32 [T, T]``: 0 on and below the diagonal, -inf above (a query's future keys)."""
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
    mask.flags.writeable = False
    return mask


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax over ``axis`` (float32, in place on a fresh array)."""
    out = x - x.max(axis=axis, keepdims=True)
    np.exp(out, out=out)
    out /= out.sum(axis=axis, keepdims=True)
    return out


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``silu(gate) * up`` elementwise, ``[T, hidden_dim]``."""
    with np.errstate(over="ignore"):  # exp(-g) overflows to inf for g << 0: silu -> -0, right
        return gate / (1.0 + np.exp(-gate)) * up


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class Model:
    """A Llama-family model with float32 weights, a tokenizer, and a NumPy forward pass.

    ``m.forward(ids)`` gives logits for a fresh sequence; ``m.forward(ids, cache)`` continues the
    sequence held in ``cache`` (prefill a chunk, or decode one token).
    """

    def __init__(self, args: ModelArgs, weights: Weights, tokenizer: "Tokenizer | None" = None,
                 metadata: Mapping[str, Any] | None = None, path: Path | None = None,
                 tensor_types: Mapping[str, str] | None = None):
        self.args = args
        self.weights = weights
        self.tokenizer = tokenizer
        self.metadata = dict(metadata or {})
        self.path = path
        self.tensor_types = dict(tensor_types or {})

    # The KV cache ---------------------------------------------------------------------------
    def make_cache(self, kv: str = "fp32", **options: Any) -> KVCache:
        """A fresh, empty KV cache of type ``kv`` for this model (see :mod:`quantref.cache`)."""
        a = self.args
        return make_cache(kv, n_layers=a.n_layers, n_kv_heads=a.n_kv_heads,
                          head_dim=a.head_dim, **options)

    # The forward pass -----------------------------------------------------------------------
    def forward(self, ids: Sequence[int] | np.ndarray, cache: KVCache | None = None,
                *, last_only: bool = False, embed_scale: float = 1.0) -> np.ndarray:
        """Logits ``float32 [T, vocab]`` for tokens ``ids [T]`` that follow what ``cache`` holds.

        With no cache, a fresh fp32 cache is used: the logits of a causal pass over ``ids``.
        ``last_only`` returns just the last position's logits ``[1, vocab]`` (decode).
        ``embed_scale`` multiplies the token embeddings (1-ulp perturbations, see
        :func:`quantref.perplexity.perturbation_scale`).
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("forward needs at least one token id")
        if ids.min() < 0 or ids.max() >= self.args.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= self.args.vocab_size)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.args.vocab_size})")
        if cache is None:
            cache = self.make_cache()
        a, w = self.args, self.weights

        x = w.token_embd[ids]  # [T, dim]
        if embed_scale != 1.0:
            x = x * np.float32(embed_scale)
        positions = np.arange(cache.length, cache.length + ids.size)
        cos, sin = rope_tables(positions, a, w.rope_freqs)
        for layer in range(a.n_layers):
            x = self.block(layer, x, cache, cos, sin)
        cache.commit(ids.size)

        if last_only:
            x = x[-1:]
        x = rms_norm(x, w.output_norm, a.norm_eps)
        return x @ w.output.T  # [T, vocab]

    def block(self, layer: int, x: np.ndarray, cache: KVCache,
              cos: np.ndarray | None = None, sin: np.ndarray | None = None) -> np.ndarray:
        """One transformer block: ``x [T, dim] -> [T, dim]``, appending K/V of ``x`` to ``cache``.

        ``cos``/``sin`` are the RoPE tables of the T positions after ``cache.length`` (computed
        here when not given). Called on its own by the layer-by-layer parity tests.
        """
        a, lw = self.args, self.weights.layers[layer]
        if cos is None or sin is None:
            positions = np.arange(cache.length, cache.length + x.shape[0])
            cos, sin = rope_tables(positions, a, self.weights.rope_freqs)

        # Attention: x + wo(attend(rope(wq h), rope(wk h), wv h)), h = rms_norm(x).
        h = rms_norm(x, lw.attn_norm, a.norm_eps)
        x = x + self.attention(layer, h, cache, cos, sin)

        # Feed-forward: x + w_down(silu(w_gate h) * w_up h), h = rms_norm(x).
        h = rms_norm(x, lw.ffn_norm, a.norm_eps)
        return x + swiglu(h @ lw.w_gate.T, h @ lw.w_up.T) @ lw.w_down.T

    def attention(self, layer: int, h: np.ndarray, cache: KVCache,
                  cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Causal grouped-query attention of the chunk ``h [T, dim]`` -> ``[T, dim]``."""
        a, lw = self.args, self.weights.layers[layer]
        T = h.shape[0]
        q = rope((h @ lw.wq.T).reshape(T, a.n_heads, a.head_dim), cos, sin)
        k = rope((h @ lw.wk.T).reshape(T, a.n_kv_heads, a.head_dim), cos, sin)
        v = (h @ lw.wv.T).reshape(T, a.n_kv_heads, a.head_dim)

        # The cache stores this chunk's keys first, so a token attends to its own stored key
        # (compressed caches: its own *compressed* key, as quant.cpp does).
        cache.append(layer, k.transpose(1, 0, 2), v.transpose(1, 0, 2))
        L = cache.length + T  # tokens visible to the newest query

        # Query head j uses KV head j // n_groups: view q as [n_kv_heads, n_groups, T, head_dim].
        q = q.reshape(T, a.n_kv_heads, a.n_groups, a.head_dim).transpose(1, 2, 0, 3)
        scores = cache.scores(layer, q)  # [n_kv_heads, n_groups, T, L], not yet scaled
        scores *= np.float32(1.0 / math.sqrt(a.head_dim))
        # Query t sits at position L - T + t: it sees every older key, and keys of this chunk
        # up to its own. Only the chunk's own T x T corner needs masking.
        scores[..., L - T:] += causal_mask(T)
        probs = softmax(scores).reshape(a.n_kv_heads, a.n_groups * T, L)
        out = probs @ cache.values(layer)  # [n_kv_heads, n_groups * T, head_dim]
        out = out.reshape(a.n_kv_heads, a.n_groups, T, a.head_dim)
        return out.transpose(2, 0, 1, 3).reshape(T, a.n_heads * a.head_dim) @ lw.wo.T

    # Conveniences ---------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        return self.weights.n_params

    def __repr__(self) -> str:
        a = self.args
        return (f"Model({self.path.name if self.path else '?'}: {a.n_layers} layers, dim {a.dim}, "
                f"{a.n_heads}/{a.n_kv_heads} heads of {a.head_dim}, vocab {a.vocab_size})")


def load(path: str | Path | None = None, *, cache_dir: str | Path | None = None) -> Model:
    """Load a Llama-family GGUF (the default model, fetched on first use, when ``path`` is None).

    ``path`` may also name a known model (``quantref.fetch.MODELS``). Weights are dequantized to
    float32 once, here.
    """
    from .fetch import MODELS, model_path
    from .tokenizer import from_gguf

    if path is None or (isinstance(path, str) and path in MODELS):
        path = model_path(path or "smollm2-135m", cache_dir)
    path = Path(path)
    with gguf.read(path) as gf:
        args = ModelArgs.from_metadata(gf.metadata, list(gf.tensors), path)
        weights = load_weights(gf, args)
        tokenizer = from_gguf(gf)
        types = {name: t.qtype.name for name, t in gf.tensors.items()}
        metadata = {k: v for k, v in gf.metadata.items()
                    if not k.startswith("tokenizer.ggml.") or k.endswith("_id")
                    or k in ("tokenizer.ggml.model", "tokenizer.ggml.pre")}
    return Model(args, weights, tokenizer, metadata=metadata, path=path, tensor_types=types)
