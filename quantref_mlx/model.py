"""The Llama-family forward pass in MLX: quantref's graph, evaluated lazily.

Every architecture of :mod:`quantref.model` (llama, qwen2, qwen3, phi3, gemma3) runs here with
the same options, read from the same :class:`quantref.model.ModelArgs`.

This file mirrors :mod:`quantref.model` name for name; hold them side by side. The difference is
*when* arithmetic happens: every function here only builds MLX graph nodes, and nothing is
computed until the caller evaluates a whole step (one ``mx.eval`` per decoded token or prefill
chunk; see :mod:`quantref_mlx.perplexity` and :mod:`quantref_mlx.generate`). That is the point
of this half: quant.cpp's Metal backend dispatched and waited on every matmul, and lost to its
own CPU path.

``sync="op"`` evaluates after every operation instead: the per-op-sync pattern, kept on purpose
so that its cost can be measured (``bench/decode_speed.py``).

Weights come in two layouts (``load(..., weights=...)``):

- ``"quantized"``: Q4_0 / Q4_1 / Q8_0 tensors stay quantized on the device, as ``mx.load``
  reads them from the GGUF (MLX's affine format, group size 32, which represents these ggml
  blocks exactly), and run through ``mx.quantized_matmul``: 4-6x fewer bytes to read per token
  than float32, which is what decode speed on a GPU depends on.
- ``"float"``: every tensor dequantized by the NumPy oracle (:mod:`quantref.quants`) and held as
  float32, so both halves compute with bit-identical weights (the parity tests use it).
- ``"auto"`` (default): quantized on GPUs, float on the CPU (where MLX's quantized matmul is a
  plain loop and a float32 matmul goes through BLAS); see :func:`default_layout`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import mlx.core as mx
import numpy as np

from quantref.model import SUPPORTED_ARCHITECTURES, ModelArgs, UnsupportedModelError

from .cache import KVCache, make_cache

if TYPE_CHECKING:
    from quantref.tokenizer import Tokenizer

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "LayerWeights",
    "Fused",
    "Linear",
    "Model",
    "ModelArgs",
    "UnsupportedModelError",
    "Weights",
    "causal_mask",
    "from_oracle",
    "load",
    "on_gpu",
    "rms_norm",
    "rope",
    "softmax",
    "swiglu",
    "geglu",
    "window_mask",
]

WEIGHT_LAYOUTS = ("auto", "quantized", "float")
# LayerWeights' optional vectors and their GGUF tensor names (blk.N.<name>)
OPTIONAL = {"bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias",
            "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
            "attn_post_norm": "post_attention_norm.weight", "ffn_post_norm": "post_ffw_norm.weight"}


@dataclass
class Linear:
    """A weight ``[out_features, in_features]``: float, or MLX-quantized (affine, per group).

    ``x [..., in] -> [..., out]``. A quantized weight also serves as an embedding table
    (:meth:`rows`), as the tied output projection does.
    """

    weight: mx.array  # float32 [out, in], or packed uint32 [out, in * bits / 32]
    scales: mx.array | None = None  # [out, in / group_size]
    biases: mx.array | None = None
    group_size: int = 32
    bits: int = 0  # 0: a float weight

    def __call__(self, x: mx.array) -> mx.array:
        if not self.bits:
            return x @ self.weight.T
        return mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=True,
                                   group_size=self.group_size, bits=self.bits)

    def rows(self, ids: mx.array) -> mx.array:
        """Rows ``ids [T]`` of the weight as float32 ``[T, in]`` (an embedding lookup)."""
        if not self.bits:
            return self.weight[ids]
        # Dequantize in float32: scale * q + bias is exact there for ggml's blocks (MLX's own
        # dequantize would round to the scales' float16).
        w = self.weight[ids]
        q = _unpack(w, self.bits)  # [T, in] float32 integer codes
        s = mx.repeat(self.scales[ids].astype(mx.float32), self.group_size, axis=-1)
        b = mx.repeat(self.biases[ids].astype(mx.float32), self.group_size, axis=-1)
        return q * s + b

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.weight, self.scales, self.biases) if a is not None)


def _unpack(packed: mx.array, bits: int) -> mx.array:
    """MLX's packed uint32 codes ``[..., n * bits / 32]`` -> float32 codes ``[..., n]``."""
    per_word = 32 // bits
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_word).astype(mx.float32)


@dataclass
class Fused:
    """Linear maps of one input, as one matrix when their layouts agree (outputs side by side).

    One matmul kernel instead of two or three: a decode step on a GPU is bound by how many
    kernels it launches, not by arithmetic. Maps of different layouts (say a Q6_K V projection
    beside Q4_0 Q and K) stay separate.
    """

    sizes: list[int]  # output features of each map
    whole: Linear | None = None  # the concatenated map, when the layouts agree
    parts: list[Linear] | None = None  # otherwise the maps themselves

    @classmethod
    def of(cls, *maps: Linear) -> "Fused":
        sizes = [m.weight.shape[0] for m in maps]
        first = maps[0]
        if all(m.bits == first.bits and m.group_size == first.group_size for m in maps):
            cat = lambda name: mx.concatenate([getattr(m, name) for m in maps])  # noqa: E731
            whole = Linear(cat("weight"), cat("scales") if first.bits else None,
                           cat("biases") if first.bits else None, first.group_size, first.bits)
            return cls(sizes, whole=whole)
        return cls(sizes, parts=list(maps))

    def __call__(self, x: mx.array) -> list[mx.array]:
        if self.whole is None:
            return [m(x) for m in self.parts]
        bounds = np.cumsum(self.sizes)[:-1].tolist()
        return mx.split(self.whole(x), bounds, axis=-1)

    @property
    def linears(self) -> list[Linear]:
        return [self.whole] if self.whole is not None else list(self.parts)


@dataclass
class LayerWeights:
    """One transformer block. Where the oracle has wq, wk, wv and w_gate, w_up, this has one
    :class:`Fused` map each (see there why)."""

    attn_norm: mx.array  # [dim]
    wqkv: Fused  # [(n_heads + 2 n_kv_heads) * head_dim, dim] -> q, k, v
    wo: Linear  # [dim, n_heads * head_dim]
    ffn_norm: mx.array  # [dim]
    w_gate_up: Fused  # [2 * hidden_dim, dim] -> gate, up
    w_down: Linear  # [dim, hidden_dim]
    # Optional, by architecture, as in quantref.model.LayerWeights (None where absent):
    bq: mx.array | None = None  # [n_heads * head_dim] (qwen2)
    bk: mx.array | None = None
    bv: mx.array | None = None
    q_norm: mx.array | None = None  # [head_dim] (qwen3, gemma3)
    k_norm: mx.array | None = None
    attn_post_norm: mx.array | None = None  # [dim] (gemma3)
    ffn_post_norm: mx.array | None = None

    @classmethod
    def of(cls, attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down,
           **optional: mx.array | None) -> "LayerWeights":
        return cls(attn_norm, Fused.of(wq, wk, wv), wo, ffn_norm, Fused.of(w_gate, w_up), w_down,
                   **optional)

    @property
    def vectors(self) -> list[mx.array]:
        """The norms and biases (every weight that is not a linear map)."""
        return [a for a in (self.attn_norm, self.ffn_norm, self.bq, self.bk, self.bv,
                            self.q_norm, self.k_norm, self.attn_post_norm, self.ffn_post_norm)
                if a is not None]

    @property
    def linears(self) -> list[Linear]:
        return self.wqkv.linears + [self.wo] + self.w_gate_up.linears + [self.w_down]


@dataclass
class Weights:
    token_embd: Linear  # [vocab, dim]
    layers: list[LayerWeights]
    output_norm: mx.array  # [dim]
    output: Linear  # [vocab, dim]; the same object as token_embd when tied
    rope_freqs: mx.array | None = None  # [rope_dim // 2]

    @property
    def nbytes(self) -> int:
        total = self.token_embd.nbytes + self.output_norm.nbytes
        if self.output is not self.token_embd:
            total += self.output.nbytes
        for lw in self.layers:
            total += sum(a.nbytes for a in lw.vectors) + sum(m.nbytes for m in lw.linears)
        return total


# ---------------------------------------------------------------------------------------------
# The building blocks, as in quantref.model
# ---------------------------------------------------------------------------------------------

def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """``x [..., d] -> [..., d]``: x / sqrt(mean(x^2) + eps) * weight over the last axis
    (MLX's fused kernel)."""
    return mx.fast.rms_norm(x, weight, eps)


def rope(x: mx.array, offset: int, args: ModelArgs, rope_freqs: mx.array | None,
         swa: bool = False) -> mx.array:
    """Rotate pairs of dims of each head of ``x [heads, T, head_dim]`` for positions
    ``offset .. offset + T - 1``: adjacent pairs for llama (``traditional=True`` is MLX's name
    for that form, which GGUF Llama weights need), pairs ``(i, i + rope_dim/2)`` where
    ``args.rope_neox``. ``swa``: a sliding-window layer's base and scale (as
    :func:`quantref.model.rope_tables`)."""
    base, scale = (args.rope_base_swa, 1.0) if swa else (args.rope_base, args.rope_scale)
    traditional = not args.rope_neox
    if rope_freqs is None:
        return mx.fast.rope(x, args.rope_dim, traditional=traditional, base=base,
                            scale=1.0 / scale, offset=offset)
    # MLX takes periods: angle = position / period; period_i = base^(2i/d) * factor_i
    periods = (base ** (mx.arange(0, args.rope_dim, 2, dtype=mx.float32)
                        / args.rope_dim)) * rope_freqs
    return mx.fast.rope(x, args.rope_dim, traditional=traditional, base=None,
                        scale=1.0 / scale, offset=offset, freqs=periods)


def causal_mask(T: int, L: int) -> mx.array:
    """``float32 [T, L]`` additive mask: query t (at position L - T + t) sees keys 0..L-T+t."""
    q_pos = mx.arange(L - T, L)[:, None]
    k_pos = mx.arange(L)[None, :]
    return mx.where(k_pos > q_pos, mx.array(-mx.inf, mx.float32), mx.array(0.0, mx.float32))


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Softmax over ``axis`` in float32."""
    return mx.softmax(x, axis=axis, precise=True)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up``."""
    return gate * mx.sigmoid(gate) * up


_SQRT_2_OVER_PI = 0.79788456080286535587989211986876  # ggml's constants, as quantref.model
_GELU_COEF_A = 0.044715


def geglu(gate: mx.array, up: mx.array) -> mx.array:
    """``gelu(gate) * up`` with GELU's tanh form, as :func:`quantref.model.geglu`."""
    inner = _SQRT_2_OVER_PI * gate * (1.0 + _GELU_COEF_A * gate * gate)
    return 0.5 * gate * (1.0 + mx.tanh(inner)) * up


def window_mask(offset, T: int, L: int, window: int) -> mx.array:
    """Additive ``float32 [T, L]``: -inf where key ``p0`` is too old for query ``t`` (at position
    ``offset + t``) of a sliding-window layer, ``p1 - p0 >= window``, else 0. ``offset``: an
    int, or an int32 array inside a compiled step (:func:`quantref.model.window_mask`)."""
    q_pos = offset + mx.arange(T)[:, None]
    k_pos = mx.arange(L)[None, :]
    return mx.where(k_pos <= q_pos - window, mx.array(-mx.inf, mx.float32),
                    mx.array(0.0, mx.float32))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class Model:
    """A Llama-family model in MLX. ``forward`` returns *lazy* logits: evaluate them (once per
    step) with ``mx.eval``. ``sync="op"`` evaluates after every operation instead."""

    def __init__(self, args: ModelArgs, weights: Weights, tokenizer: "Tokenizer | None" = None,
                 metadata: Mapping[str, Any] | None = None, path: Path | None = None,
                 layout: str = "quantized", sync: str = "step"):
        if sync not in ("step", "op"):
            raise ValueError(f"sync must be 'step' or 'op', got {sync!r}")
        self.args = args
        self.weights = weights
        self.tokenizer = tokenizer
        self.metadata = dict(metadata or {})
        self.path = path
        self.layout = layout
        self.sync = sync

    def _op(self, x: mx.array) -> mx.array:
        """The per-op-sync switch: in ``sync="op"`` mode every operation is waited for."""
        if self.sync == "op":
            mx.eval(x)
        return x

    def make_cache(self, kv: str = "fp32", **options: Any) -> KVCache:
        a = self.args
        return make_cache(kv, n_layers=a.n_layers, n_kv_heads=a.n_kv_heads,
                          head_dim=a.head_dim, sync=self._op, **options)

    def forward(self, ids: Sequence[int] | np.ndarray | mx.array, cache: KVCache | None = None,
                *, last_only: bool = False, embed_scale: float = 1.0) -> mx.array:
        """Lazy logits ``float32 [T, vocab]`` for tokens ``ids [T]`` following ``cache``."""
        if not isinstance(ids, mx.array):
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            if ids.size == 0:
                raise ValueError("forward needs at least one token id")
            if ids.min() < 0 or ids.max() >= self.args.vocab_size:
                bad = int(ids[(ids < 0) | (ids >= self.args.vocab_size)][0])
                raise ValueError(f"token id {bad} is outside the vocabulary "
                                 f"[0, {self.args.vocab_size})")
            ids = mx.array(ids.astype(np.int32))
        if cache is None:
            cache = self.make_cache()
        a, w, op = self.args, self.weights, self._op

        x = op(w.token_embd.rows(ids))  # [T, dim]
        if a.embed_scale != 1.0:  # gemma3: sqrt(dim)
            x = op(x * mx.array(a.embed_scale, mx.float32))
        if embed_scale != 1.0:
            x = op(x * mx.array(embed_scale, mx.float32))
        for layer in range(a.n_layers):
            x = self.block(layer, x, cache)
        cache.commit(ids.shape[0])

        if last_only:
            x = x[-1:]
        x = op(rms_norm(x, w.output_norm, a.norm_eps))
        logits = op(w.output(x))  # [T, vocab]
        if a.logit_softcap:
            c = mx.array(a.logit_softcap, mx.float32)
            logits = op(mx.tanh(logits / c) * c)
        return logits

    def block(self, layer: int, x: mx.array, cache: KVCache) -> mx.array:
        """One transformer block: ``x [T, dim] -> [T, dim]``, appending its K/V to ``cache``."""
        a, lw, op = self.args, self.weights.layers[layer], self._op
        h = op(rms_norm(x, lw.attn_norm, a.norm_eps))
        out = self.attention(layer, h, cache)
        if lw.attn_post_norm is not None:  # gemma3
            out = op(rms_norm(out, lw.attn_post_norm, a.norm_eps))
        x = op(x + out)
        h = op(rms_norm(x, lw.ffn_norm, a.norm_eps))
        gate, up = (op(y) for y in lw.w_gate_up(h))
        act = geglu if a.ffn_act == "gelu" else swiglu
        out = op(lw.w_down(op(act(gate, up))))
        if lw.ffn_post_norm is not None:
            out = op(rms_norm(out, lw.ffn_post_norm, a.norm_eps))
        return op(x + out)

    def attention(self, layer: int, h: mx.array, cache: KVCache) -> mx.array:
        """Causal grouped-query attention of the chunk ``h [T, dim]`` -> ``[T, dim]``; on a
        sliding-window layer over the newest ``args.sliding_window`` keys (older ones masked,
        as in :meth:`quantref.model.Model.attention`)."""
        a, lw, op = self.args, self.weights.layers[layer], self._op
        T = h.shape[0]
        offset = cache.offset  # an int, or an int32 array inside a compiled step
        freqs = self.weights.rope_freqs
        swa = a.is_swa(layer)
        q, k, v = (op(y) for y in lw.wqkv(h))
        if lw.bq is not None:  # qwen2
            q, k, v = op(q + lw.bq), op(k + lw.bk), op(v + lw.bv)
        q = q.reshape(T, a.n_heads, a.head_dim).transpose(1, 0, 2)  # [n_heads, T, head_dim]
        k = k.reshape(T, a.n_kv_heads, a.head_dim).transpose(1, 0, 2)
        v = v.reshape(T, a.n_kv_heads, a.head_dim).transpose(1, 0, 2)
        if lw.q_norm is not None:  # qwen3, gemma3: per head, before RoPE
            q, k = op(rms_norm(q, lw.q_norm, a.norm_eps)), op(rms_norm(k, lw.k_norm, a.norm_eps))
        q, k = op(rope(q, offset, a, freqs, swa)), op(rope(k, offset, a, freqs, swa))
        scale = 1.0 / math.sqrt(a.head_dim)
        if a.attn_scale:  # gemma3 scales the queries, then attends unscaled
            q, scale = op(q * mx.array(a.attn_scale, mx.float32)), 1.0

        cache.append(layer, k, v)  # [n_kv_heads, T, head_dim] each
        mask = cache.mask(T)  # additive [T, L], or None (one query sees every key)
        if swa and not (isinstance(offset, int) and offset + T <= a.sliding_window):
            # keys: the L = offset + T stored, or a compiled step's fixed capacity
            L = offset + T if isinstance(offset, int) else cache.capacity
            wm = window_mask(offset, T, L, a.sliding_window)
            # a new array, never `mask += wm`: a compiled step's mask serves every layer
            mask = wm if mask is None else mask + wm
        # turbo_kv caches on CUDA, a chunk of T > 1 rows: one kernel reads the blocks and gives
        # the attention output (quantref_mlx.turbo_prefill); None where the graph below runs
        prefill = getattr(cache, "prefill_attention", None)  # KVCache's, not StepCache's
        out = prefill(layer, q, scale, a.sliding_window if swa else 0) if prefill else None
        if out is not None:
            return op(lw.wo(out))
        if cache.fused_attention:
            # fp32 / fp16 caches: MLX's attention kernel does scores, mask, softmax and values
            # in one dispatch (GQA included) instead of five.
            out = op(mx.fast.scaled_dot_product_attention(
                q[None], cache.keys(layer)[None], cache.values(layer)[None], scale=scale,
                mask=mask)[0])
        else:
            # As the oracle: scores through the cache's own format, mask, softmax, values.
            # Query head j uses KV head j // n_groups: [n_kv_heads, n_groups, T, head_dim]
            scores = op(cache.scores(layer, q.reshape(a.n_kv_heads, a.n_groups, T, a.head_dim))
                        * scale)  # [n_kv_heads, n_groups, T, L]
            if mask is not None:
                scores = op(scores + mask)
            L = scores.shape[-1]
            probs = op(softmax(scores)).reshape(a.n_kv_heads, a.n_groups * T, L)
            out = op(probs @ cache.values(layer))  # [n_kv_heads, n_groups * T, head_dim]
        out = out.reshape(a.n_heads, T, a.head_dim).transpose(1, 0, 2).reshape(T, -1)
        return op(lw.wo(out))

    @property
    def n_params(self) -> int:
        return int(sum(p for p in self._param_counts()))

    def _param_counts(self):
        w = self.weights
        for lin in [w.token_embd] + [m for lw in w.layers for m in lw.linears]:
            rows, cols = lin.weight.shape
            yield rows * (cols * 32 // lin.bits if lin.bits else cols)

    def __repr__(self) -> str:
        a = self.args
        return (f"quantref_mlx.Model({self.path.name if self.path else '?'}: {a.n_layers} layers,"
                f" dim {a.dim}, weights {self.layout}, sync {self.sync}, device "
                f"{mx.default_device()})")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _float_weights(numpy_weights) -> Weights:
    """The NumPy oracle's float32 weights, moved into MLX arrays."""
    lin = lambda a: Linear(mx.array(a))  # noqa: E731
    vec = lambda a: None if a is None else mx.array(a)  # noqa: E731
    layers = [LayerWeights.of(
        attn_norm=mx.array(lw.attn_norm), wq=lin(lw.wq), wk=lin(lw.wk), wv=lin(lw.wv),
        wo=lin(lw.wo), ffn_norm=mx.array(lw.ffn_norm), w_gate=lin(lw.w_gate), w_up=lin(lw.w_up),
        w_down=lin(lw.w_down), **{name: vec(getattr(lw, name)) for name in OPTIONAL})
        for lw in numpy_weights.layers]
    embd = lin(numpy_weights.token_embd)
    output = embd if numpy_weights.output is numpy_weights.token_embd else lin(numpy_weights.output)
    rf = numpy_weights.rope_freqs
    return Weights(token_embd=embd, layers=layers, output_norm=mx.array(numpy_weights.output_norm),
                   output=output, rope_freqs=None if rf is None else mx.array(rf))


def from_oracle(model, weights: str = "float", bits: int = 4, sync: str = "step",
                embed_bits: int | None = None) -> Model:
    """An MLX twin of a NumPy :class:`quantref.Model` (e.g. ``quantref.testing.random_model``):
    ``weights="float"`` copies the float32 weights; ``"quantized"`` quantizes every linear
    weight with ``mx.quantize`` (``bits``, group size 32, as MLX keeps Q4_1 / Q8_0 GGUFs; the
    embedding with ``embed_bits``, default ``bits``: SmolLM2's file is Q4_1 with a Q8_0
    embedding, ``bits=4, embed_bits=8``)."""
    if weights == "auto":
        weights = default_layout()
    w = _float_weights(model.weights)
    if weights == "quantized":
        def q(lin: Linear, bits: int = bits) -> Linear:
            packed, scales, biases = mx.quantize(lin.weight, group_size=32, bits=bits)
            # rounded through float16 as a GGUF's block scales are, then held in float32
            return Linear(packed, scales.astype(mx.float16).astype(mx.float32),
                          biases.astype(mx.float16).astype(mx.float32), group_size=32, bits=bits)

        tied = w.output is w.token_embd
        for lw in w.layers:
            lw.wqkv.whole, lw.w_gate_up.whole = q(lw.wqkv.whole), q(lw.w_gate_up.whole)
            lw.wo, lw.w_down = q(lw.wo), q(lw.w_down)
        w.token_embd = q(w.token_embd, embed_bits or bits)
        w.output = w.token_embd if tied else q(w.output)
    mx.eval(w.token_embd.weight, *[m.weight for lw in w.layers for m in lw.linears])
    return Model(model.args, w, model.tokenizer, metadata=model.metadata, path=model.path,
                 layout=weights, sync=sync)


def _quantized_weights(path: Path, gf, args: ModelArgs) -> Weights:
    """Q4_0 / Q4_1 / Q8_0 tensors kept quantized as ``mx.load`` reads them; any other type
    dequantized by the NumPy oracle to float32."""
    loaded = mx.load(str(path))
    bits_of = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}

    def linear(name: str) -> Linear:
        info = gf.tensors[name]
        base = name[: -len(".weight")]
        bits = bits_of.get(info.qtype.name)
        if bits and f"{base}.scales" in loaded:
            # float16 scales and biases -> float32 (exact): with float32 activations,
            # quantized_matmul would otherwise convert them on every call (two more kernels)
            return Linear(loaded[name], loaded[f"{base}.scales"].astype(mx.float32),
                          loaded[f"{base}.biases"].astype(mx.float32), group_size=32, bits=bits)
        return Linear(mx.array(np.asarray(gf.tensor(name), dtype=np.float32)))

    def vector(name: str) -> mx.array:
        if name not in gf.tensors:
            raise UnsupportedModelError(f"{path}: tensor {name!r} is missing")
        return mx.array(np.asarray(gf.tensor(name), dtype=np.float32))

    a = args
    wanted = {"bq": a.qkv_bias, "bk": a.qkv_bias, "bv": a.qkv_bias, "q_norm": a.qk_norm,
              "k_norm": a.qk_norm, "attn_post_norm": a.post_norms, "ffn_post_norm": a.post_norms}
    q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    layers = []
    for i in range(args.n_layers):
        b = f"blk.{i}."
        optional = {name: vector(b + t) if wanted[name] else None
                    for name, t in OPTIONAL.items()}
        if args.fused_qkv:  # phi3: the file's fused maps are already one matrix each
            lw = LayerWeights(
                attn_norm=vector(b + "attn_norm.weight"),
                wqkv=Fused([q_dim, kv_dim, kv_dim], whole=linear(b + "attn_qkv.weight")),
                wo=linear(b + "attn_output.weight"), ffn_norm=vector(b + "ffn_norm.weight"),
                w_gate_up=Fused([args.hidden_dim] * 2, whole=linear(b + "ffn_up.weight")),
                w_down=linear(b + "ffn_down.weight"), **optional)
        else:
            lw = LayerWeights.of(
                attn_norm=vector(b + "attn_norm.weight"), wq=linear(b + "attn_q.weight"),
                wk=linear(b + "attn_k.weight"), wv=linear(b + "attn_v.weight"),
                wo=linear(b + "attn_output.weight"), ffn_norm=vector(b + "ffn_norm.weight"),
                w_gate=linear(b + "ffn_gate.weight"), w_up=linear(b + "ffn_up.weight"),
                w_down=linear(b + "ffn_down.weight"), **optional)
        layers.append(lw)
    embd = linear("token_embd.weight")
    output = embd if args.tied_embeddings else linear("output.weight")
    rf = vector("rope_freqs.weight") if "rope_freqs.weight" in gf.tensors else None
    return Weights(token_embd=embd, layers=layers, output_norm=vector("output_norm.weight"),
                   output=output, rope_freqs=rf)


def on_gpu() -> bool:
    """Whether MLX's default device is a GPU (Metal or CUDA)."""
    return mx.default_device().type == mx.DeviceType.gpu


def default_layout() -> str:
    """The weight layout ``weights="auto"`` picks: quantized on a GPU, float on the CPU.

    On NVIDIA GPUs decoding runs the fused kernels (:mod:`quantref_mlx.fused_decode`), which
    read the packed codes themselves: an H100 decoded SmolLM2-135M's shapes at context 128
    faster with 4-bit weights than with float32 in every same-run comparison
    (``docs/benchmarks.md``), with ~5x less memory; prefill (``mx.quantized_matmul``) is
    ~10-20% slower than float32 there, and turbo_kv caches (which decode through the plain
    graph and ``mx.quantized_matmul``) were no slower with quantized weights in our runs. On
    the CPU MLX's quantized matmul is a plain loop; Apple GPUs are where quantized weights
    were meant to win from the start.
    """
    return "quantized" if on_gpu() else "float"


def load(path: str | Path | None = None, *, weights: str = "auto", sync: str = "step",
         cache_dir: str | Path | None = None) -> Model:
    """Load a Llama-family GGUF into MLX (the default model when ``path`` is None).

    ``weights``: ``"auto"`` (default), ``"quantized"`` or ``"float"``; see the module docstring.
    """
    from quantref import gguf
    from quantref.fetch import MODELS, chat_template_for, model_path
    from quantref.model import load_weights
    from quantref.tokenizer import from_gguf

    if weights not in WEIGHT_LAYOUTS:
        raise ValueError(f"weights must be one of {WEIGHT_LAYOUTS}, got {weights!r}")
    if weights == "auto":
        weights = default_layout()
    if path is None or (isinstance(path, str) and path in MODELS):
        path = model_path(path or "smollm2-135m", cache_dir)
    path = Path(path)
    with gguf.read(path) as gf:
        args = ModelArgs.from_metadata(gf.metadata, list(gf.tensors), path)
        if weights == "float":
            w = _float_weights(load_weights(gf, args))
        else:
            w = _quantized_weights(path, gf, args)
        tokenizer = from_gguf(gf)
        if tokenizer.chat_template is None:  # a known file without one: its release's
            tokenizer.chat_template = chat_template_for(path)
        metadata = {k: v for k, v in gf.metadata.items() if not k.startswith("tokenizer.ggml.")}
    mx.eval(w.token_embd.weight, *[m.weight for lw in w.layers for m in lw.linears])
    return Model(args, w, tokenizer, metadata=metadata, path=path, layout=weights, sync=sync)
