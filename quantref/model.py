"""The Llama-family forward pass in NumPy: the readable oracle.

A token's whole journey is in :meth:`Model.forward`, top to bottom, in the manner of llama2.c
and picoGPT: embedding, then per layer RMSNorm -> attention (RoPE, GQA, causal softmax against
the KV cache) -> residual -> RMSNorm -> SwiGLU feed-forward -> residual, then the final norm and
the output projection. All arithmetic is float32; weights are dequantized to float32 once, at
load. How keys and values are *stored* is the KV cache's business (:mod:`quantref.cache`), so
compressed caches plug in without touching this file.

The architectures (``general.architecture``) are variations on that one block, each an option of
:class:`ModelArgs` or an optional tensor, following llama.cpp's graphs (``src/models/*.cpp`` of
the llama.cpp vendored in llama-cpp-python 0.3.36):

- ``llama``: as above; RoPE on adjacent pairs; Llama 3.1+ ``rope_freqs.weight`` divisors.
- ``qwen2``: Q/K/V biases (``attn_{q,k,v}.bias``), often an untied output; NEOX RoPE (pairs
  ``i, i + rope_dim / 2``).
- ``qwen3``: RMSNorm of each query and key head (``attn_{q,k}_norm``) before RoPE; NEOX RoPE.
- ``phi3``: Q, K, V in one tensor (``attn_qkv``) and gate|up in one (``ffn_up``, gate first),
  split at load; NEOX RoPE.
- ``gemma3``: embeddings scaled by ``sqrt(dim)``; Q/K norms; RMSNorm after attention and after
  the feed-forward too (``post_attention_norm``, ``post_ffw_norm``); GELU-gated feed-forward
  (tanh form); queries scaled before attention; 5 of every 6 layers attend to a sliding window
  of the newest ``sliding_window`` positions with RoPE base 10,000 (llama.cpp's default for
  ``rope_freq_base_train_swa``), the others to everything with ``rope.freq_base``.

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
    "geglu",
    "window_mask",
]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma3")


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
    # Architecture options (defaults: llama). See the module docstring.
    arch: str = "llama"  # general.architecture
    rope_neox: bool = False  # RoPE turns pairs (i, i + rope_dim/2), llama.cpp's NEOX type
    attn_scale: float = 0.0  # queries times this before attention; 0: scores / sqrt(head_dim)
    embed_scale: float = 1.0  # token embeddings times this (gemma3: sqrt(dim))
    ffn_act: str = "silu"  # the gate's activation: silu (SwiGLU) or gelu (GeGLU, tanh form)
    sliding_window: int = 0  # a sliding-window layer's query sees its newest n keys (itself too)
    swa_layers: tuple[bool, ...] = ()  # per layer: True for sliding-window attention
    rope_base_swa: float = 10000.0  # RoPE base of the sliding-window layers (scale 1 there)
    logit_softcap: float = 0.0  # final logits -> c * tanh(logits / c) when c > 0
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE
    post_norms: bool = False  # RMSNorm of the attention and feed-forward outputs (gemma3)
    qkv_bias: bool = False  # attn_{q,k,v}.bias added to the projections
    fused_qkv: bool = False  # the file holds attn_qkv (and gate|up in ffn_up): phi3

    @property
    def n_groups(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def llama_block(self) -> bool:
        """True when every block is plain llama's: adjacent-pair RoPE, no biases, norms or
        window beyond its two RMSNorms, SwiGLU, scores scaled by 1/sqrt(head_dim). What a
        kernel written for llama's block (quantref_mlx.fused_decode) may assume."""
        return (self.arch == "llama" and not self.rope_neox and not self.attn_scale
                and self.embed_scale == 1.0 and self.ffn_act == "silu" and not self.sliding_window
                and not self.logit_softcap and not self.qk_norm and not self.post_norms
                and not self.qkv_bias)

    def is_swa(self, layer: int) -> bool:
        """Whether ``layer`` attends to a sliding window (False for every layer of a model
        without one)."""
        return bool(self.sliding_window) and bool(self.swa_layers) and self.swa_layers[layer]

    @property
    def options(self) -> dict[str, Any]:
        """The architecture options that differ from plain llama's, for ``quantref info``."""
        base = ModelArgs(vocab_size=0, dim=0, n_layers=0, n_heads=1, n_kv_heads=1, head_dim=0,
                         hidden_dim=0, norm_eps=0.0, rope_base=0.0, rope_dim=0, rope_scale=1.0,
                         max_seq_len=0, tied_embeddings=True)
        out = {}
        for name in ("rope_neox", "attn_scale", "embed_scale", "ffn_act", "sliding_window",
                     "rope_base_swa", "logit_softcap", "qk_norm", "post_norms", "qkv_bias",
                     "fused_qkv"):
            if getattr(self, name) != getattr(base, name):
                out[name] = getattr(self, name)
        if self.sliding_window:
            out["rope_base_swa"] = self.rope_base_swa
            out["swa_layers"] = [i for i, s in enumerate(self.swa_layers) if s]
        else:
            out.pop("rope_base_swa", None)
        return out

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
        n_layers = int(get("block_count"))
        names = set(tensor_names)
        opts: dict[str, Any] = dict(arch=arch, rope_neox=arch != "llama",
                                    qkv_bias="blk.0.attn_q.bias" in names)
        if arch == "qwen3":
            opts.update(qk_norm=True)
        if arch == "phi3":
            if any(n.startswith(("rope_factors_long", "rope_factors_short")) for n in names):
                raise UnsupportedModelError(
                    f"{path}: phi3 long-context RoPE factors (rope_factors_long/short) are "
                    "not supported")
            # llama.cpp ignores phi3's sliding_window (its SWA is disabled, PR 13676); so do we
            opts.update(fused_qkv="blk.0.attn_qkv.weight" in names)
        if arch == "gemma3":
            window = int(md.get(f"{arch}.attention.sliding_window", 0))
            pattern = md.get(f"{arch}.attention.sliding_window_pattern", 6)
            if hasattr(pattern, "__len__"):  # a per-layer array of flags
                swa = tuple(bool(p) for p in pattern)
                if len(swa) != n_layers:
                    raise UnsupportedModelError(
                        f"{path}: {arch}.attention.sliding_window_pattern has {len(swa)} "
                        f"entries for {n_layers} layers")
            else:  # every n-th layer is global, the rest slide (llama_hparams::set_swa_pattern)
                n = int(pattern)
                swa = tuple(n == 0 or (i % n < n - 1) for i in range(n_layers))
            # llama_model_gemma3::load_arch_hparams: 1/sqrt(head_dim), but 1/sqrt(dim/n_heads)
            # for the 27B model (62 layers), as gemma_pytorch's config does; float32 there.
            q_scale_dim = dim // n_heads if n_layers == 62 else head_dim
            opts.update(
                qk_norm=True, post_norms=True, ffn_act="gelu",
                attn_scale=float(np.float32(1.0) / np.sqrt(np.float32(q_scale_dim))),
                embed_scale=float(np.sqrt(np.float32(dim))),  # ggml_scale by sqrtf(n_embd)
                sliding_window=window, swa_layers=swa if window > 0 else (),
                rope_base_swa=float(md.get(f"{arch}.rope.freq_base_swa", 10000.0)),
                logit_softcap=float(md.get(f"{arch}.final_logit_softcapping", 0.0) or 0.0))
        return cls(
            vocab_size=int(vocab),
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            hidden_dim=int(get("feed_forward_length")),
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rope_dim=int(get("rope.dimension_count", head_dim)),
            rope_scale=rope_scale,
            max_seq_len=int(get("context_length")),
            tied_embeddings="output.weight" not in names,
            **opts,
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
    # Optional, by architecture (None where absent):
    bq: np.ndarray | None = None  # [n_heads * head_dim] (qwen2)
    bk: np.ndarray | None = None  # [n_kv_heads * head_dim]
    bv: np.ndarray | None = None  # [n_kv_heads * head_dim]
    q_norm: np.ndarray | None = None  # [head_dim] (qwen3, gemma3)
    k_norm: np.ndarray | None = None  # [head_dim]
    attn_post_norm: np.ndarray | None = None  # [dim] (gemma3)
    ffn_post_norm: np.ndarray | None = None  # [dim]


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
            arrays.extend(a for a in vars(lw).values() if a is not None)
        return sum(a.size for a in arrays)


def load_weights(gf: gguf.GGUFFile, args: ModelArgs) -> Weights:
    """Dequantize every tensor of a GGUF to float32, checking each shape against ``args``.

    phi3's fused tensors are split here: ``attn_qkv`` ``[q_dim + 2 kv_dim, dim]`` into Q, K, V
    rows (llama.cpp's build_qkv views them in that order) and ``ffn_up`` ``[2 hidden, dim]``
    into gate (the first half, to which ggml_swiglu applies SiLU) and up.
    Raises :class:`UnsupportedModelError` naming a missing tensor or a wrong shape.
    """

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
    def optional(name: str, shape: tuple[int, ...], wanted: bool) -> np.ndarray | None:
        return tensor(name, shape) if wanted else None

    layers = []
    for i in range(a.n_layers):
        b = f"blk.{i}."
        if a.fused_qkv:
            qkv = tensor(b + "attn_qkv.weight", (q_dim + 2 * kv_dim, a.dim))
            wq, wk, wv = (np.asfortranarray(m) for m in
                          np.split(qkv, [q_dim, q_dim + kv_dim]))
            gate_up = tensor(b + "ffn_up.weight", (2 * a.hidden_dim, a.dim))
            w_gate, w_up = (np.asfortranarray(m) for m in np.split(gate_up, 2))
        else:
            wq = linear(b + "attn_q.weight", (q_dim, a.dim))
            wk = linear(b + "attn_k.weight", (kv_dim, a.dim))
            wv = linear(b + "attn_v.weight", (kv_dim, a.dim))
            w_gate = linear(b + "ffn_gate.weight", (a.hidden_dim, a.dim))
            w_up = linear(b + "ffn_up.weight", (a.hidden_dim, a.dim))
        layers.append(LayerWeights(
            attn_norm=tensor(b + "attn_norm.weight", (a.dim,)),
            wq=wq, wk=wk, wv=wv,
            wo=linear(b + "attn_output.weight", (a.dim, q_dim)),
            ffn_norm=tensor(b + "ffn_norm.weight", (a.dim,)),
            w_gate=w_gate, w_up=w_up,
            w_down=linear(b + "ffn_down.weight", (a.dim, a.hidden_dim)),
            bq=optional(b + "attn_q.bias", (q_dim,), a.qkv_bias),
            bk=optional(b + "attn_k.bias", (kv_dim,), a.qkv_bias),
            bv=optional(b + "attn_v.bias", (kv_dim,), a.qkv_bias),
            q_norm=optional(b + "attn_q_norm.weight", (a.head_dim,), a.qk_norm),
            k_norm=optional(b + "attn_k_norm.weight", (a.head_dim,), a.qk_norm),
            attn_post_norm=optional(b + "post_attention_norm.weight", (a.dim,), a.post_norms),
            ffn_post_norm=optional(b + "post_ffw_norm.weight", (a.dim,), a.post_norms),
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
    """``x [..., d] -> [..., d]``: x / sqrt(mean(x^2) + eps) * weight, over the last axis
    (``[T, dim]`` for the block's norms, ``[T, heads, head_dim]`` for Q/K norms).

    The mean of squares is accumulated in float64, as ggml does, then the scale is float32.
    """
    mean_sq = np.einsum("...d,...d->...", x, x, dtype=np.float64) / x.shape[-1]
    scale = (1.0 / np.sqrt(mean_sq + eps)).astype(np.float32)
    return (x * scale[..., None]) * weight


def rope_tables(positions: np.ndarray, args: ModelArgs, rope_freqs: np.ndarray | None = None,
                *, swa: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``[T, rope_dim // 2]`` float32 for absolute ``positions [T]``.

    Pair ``i`` turns by ``pos / scale * base^(-2i / rope_dim) / freq_factor[i]``; the angles are
    computed in float64 and rounded once (llama.cpp accumulates them in float32, which differs
    in the last bits only). ``swa=True``: the tables of a sliding-window layer, base
    ``args.rope_base_swa`` and scale 1 (llama_model::get_rope_freq_base / _scale).
    """
    half = args.rope_dim // 2
    base, scale = (args.rope_base_swa, 1.0) if swa else (args.rope_base, args.rope_scale)
    inv_freq = base ** (-np.arange(half, dtype=np.float64) * 2.0 / args.rope_dim)
    if rope_freqs is not None:
        inv_freq = inv_freq / rope_freqs.astype(np.float64)
    angles = (np.asarray(positions, dtype=np.float64) / scale)[:, None] * inv_freq
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool = False) -> np.ndarray:
    """Rotate pairs of dims of each head: ``x [T, heads, head_dim]``.

    ``neox=False``: adjacent pairs ``(x[2i], x[2i+1])``. GGUF Llama weights are stored with Q
    and K rows permuted for this ("normal") form of RoPE, so it is the form for ``llama``.
    ``neox=True``: pairs ``(x[i], x[i + n/2])``, llama.cpp's NEOX type (ggml_rope_ext with
    GGML_ROPE_TYPE_NEOX), whose converters leave Q and K unpermuted: qwen2/3, phi3, gemma3.
    Only the first ``n = 2 * cos.shape[1]`` dims of a head turn; the rest pass through.
    """
    n = 2 * cos.shape[-1]
    if neox:
        first, second = x[..., : n // 2], x[..., n // 2: n]
    else:
        first, second = x[..., 0:n:2], x[..., 1:n:2]
    c, s = cos[:, None, :], sin[:, None, :]
    out = x.copy()
    if neox:
        out[..., : n // 2] = first * c - second * s
        out[..., n // 2: n] = first * s + second * c
    else:
        out[..., 0:n:2] = first * c - second * s
        out[..., 1:n:2] = first * s + second * c
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


# ggml's GELU constants (ggml-cpu/vec.h): sqrt(2/pi) and the cubic coefficient of the tanh form.
_SQRT_2_OVER_PI = np.float32(0.79788456080286535587989211986876)
_GELU_COEF_A = np.float32(0.044715)


def geglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``gelu(gate) * up`` elementwise, ``[T, hidden_dim]``, GELU in its tanh form as ggml's
    ``ggml_gelu_f32``: ``0.5 g (1 + tanh(sqrt(2/pi) g (1 + 0.044715 g^2)))`` (Gemma's
    ``gelu_pytorch_tanh``). ggml's CPU build reads it from a float16 table instead (the
    ``GGML_GELU_FP16`` path); this is the formula its CUDA kernels evaluate.
    """
    inner = _SQRT_2_OVER_PI * gate * (np.float32(1.0) + _GELU_COEF_A * gate * gate)
    return np.float32(0.5) * gate * (np.float32(1.0) + np.tanh(inner)) * up


def window_mask(T: int, L: int, window: int) -> np.ndarray:
    """``bool [T, L]``: True where key ``p0`` is too old for query ``t`` of a sliding-window
    layer, the query sitting at position ``p1 = L - T + t``: ``p1 - p0 >= window``
    (llama_hparams::is_masked_swa, LLAMA_SWA_TYPE_STANDARD). A query sees ``window`` keys,
    itself included."""
    q_pos = np.arange(L - T, L)[:, None]
    return np.arange(L)[None, :] <= q_pos - window


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
        if a.embed_scale != 1.0:  # gemma3: sqrt(dim), before any perturbation
            x = x * np.float32(a.embed_scale)
        if embed_scale != 1.0:
            x = x * np.float32(embed_scale)
        positions = np.arange(cache.length, cache.length + ids.size)
        tables = {swa: rope_tables(positions, a, w.rope_freqs, swa=swa)
                  for swa in {a.is_swa(i) for i in range(a.n_layers)}}
        for layer in range(a.n_layers):
            x = self.block(layer, x, cache, *tables[a.is_swa(layer)])
        cache.commit(ids.size)

        if last_only:
            x = x[-1:]
        x = rms_norm(x, w.output_norm, a.norm_eps)
        logits = x @ w.output.T  # [T, vocab]
        if a.logit_softcap:
            c = np.float32(a.logit_softcap)
            logits = np.tanh(logits / c) * c
        return logits

    def block(self, layer: int, x: np.ndarray, cache: KVCache,
              cos: np.ndarray | None = None, sin: np.ndarray | None = None) -> np.ndarray:
        """One transformer block: ``x [T, dim] -> [T, dim]``, appending K/V of ``x`` to ``cache``.

        ``cos``/``sin`` are the RoPE tables of the T positions after ``cache.length`` (computed
        here when not given). Called on its own by the layer-by-layer parity tests.
        """
        a, lw = self.args, self.weights.layers[layer]
        if cos is None or sin is None:
            positions = np.arange(cache.length, cache.length + x.shape[0])
            cos, sin = rope_tables(positions, a, self.weights.rope_freqs, swa=a.is_swa(layer))

        # Attention: x + wo(attend(rope(wq h), rope(wk h), wv h)), h = rms_norm(x).
        h = rms_norm(x, lw.attn_norm, a.norm_eps)
        out = self.attention(layer, h, cache, cos, sin)
        if lw.attn_post_norm is not None:  # gemma3: the sub-layer's output is normed too
            out = rms_norm(out, lw.attn_post_norm, a.norm_eps)
        x = x + out

        # Feed-forward: x + w_down(act(w_gate h) * w_up h), h = rms_norm(x).
        h = rms_norm(x, lw.ffn_norm, a.norm_eps)
        act = geglu if a.ffn_act == "gelu" else swiglu
        out = act(h @ lw.w_gate.T, h @ lw.w_up.T) @ lw.w_down.T
        if lw.ffn_post_norm is not None:
            out = rms_norm(out, lw.ffn_post_norm, a.norm_eps)
        return x + out

    def attention(self, layer: int, h: np.ndarray, cache: KVCache,
                  cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Causal grouped-query attention of the chunk ``h [T, dim]`` -> ``[T, dim]``.

        On a sliding-window layer a query sees only the newest ``args.sliding_window`` keys.
        The cache keeps every token and the older ones are masked: each token's K and V are
        stored on their own (every cache type quantizes per token and head), so this gives
        the attention a cache that evicts them would give, compressed caches included.
        """
        a, lw = self.args, self.weights.layers[layer]
        T = h.shape[0]
        q, k, v = h @ lw.wq.T, h @ lw.wk.T, h @ lw.wv.T
        if lw.bq is not None:  # qwen2
            q, k, v = q + lw.bq, k + lw.bk, v + lw.bv
        q = q.reshape(T, a.n_heads, a.head_dim)
        k = k.reshape(T, a.n_kv_heads, a.head_dim)
        v = v.reshape(T, a.n_kv_heads, a.head_dim)
        if lw.q_norm is not None:  # qwen3, gemma3: per head, before RoPE
            q, k = rms_norm(q, lw.q_norm, a.norm_eps), rms_norm(k, lw.k_norm, a.norm_eps)
        q, k = rope(q, cos, sin, a.rope_neox), rope(k, cos, sin, a.rope_neox)
        if a.attn_scale:  # gemma3 scales the queries (after RoPE), then attends unscaled
            q = q * np.float32(a.attn_scale)

        # The cache stores this chunk's keys first, so a token attends to its own stored key
        # (compressed caches: its own *compressed* key, as quant.cpp does).
        cache.append(layer, k.transpose(1, 0, 2), v.transpose(1, 0, 2))
        L = cache.length + T  # tokens visible to the newest query

        # Query head j uses KV head j // n_groups: view q as [n_kv_heads, n_groups, T, head_dim].
        q = q.reshape(T, a.n_kv_heads, a.n_groups, a.head_dim).transpose(1, 2, 0, 3)
        scores = cache.scores(layer, q)  # [n_kv_heads, n_groups, T, L], not yet scaled
        if not a.attn_scale:
            scores *= np.float32(1.0 / math.sqrt(a.head_dim))
        # Query t sits at position L - T + t: it sees every older key, and keys of this chunk
        # up to its own. Only the chunk's own T x T corner needs masking.
        scores[..., L - T:] += causal_mask(T)
        if a.is_swa(layer) and L > a.sliding_window:
            scores = np.where(window_mask(T, L, a.sliding_window), np.float32(-np.inf), scores)
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
    from .fetch import MODELS, chat_template_for, model_path
    from .tokenizer import from_gguf

    if path is None or (isinstance(path, str) and path in MODELS):
        path = model_path(path or "smollm2-135m", cache_dir)
    path = Path(path)
    with gguf.read(path) as gf:
        args = ModelArgs.from_metadata(gf.metadata, list(gf.tensors), path)
        weights = load_weights(gf, args)
        tokenizer = from_gguf(gf)
        if tokenizer.chat_template is None:  # a known file without one: its release's
            tokenizer.chat_template = chat_template_for(path)
        types = {name: t.qtype.name for name, t in gf.tensors.items()}
        metadata = {k: v for k, v in gf.metadata.items()
                    if not k.startswith("tokenizer.ggml.") or k.endswith("_id")
                    or k in ("tokenizer.ggml.model", "tokenizer.ggml.pre")}
    return Model(args, weights, tokenizer, metadata=metadata, path=path, tensor_types=types)
