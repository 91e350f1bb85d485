"""Tiny random Llama GGUFs that keep most tests fast.

:func:`write_tiny_llama` writes a GGUF with the metadata keys, tensor names and shapes that
llama.cpp's converter writes for a Llama model, random weights scaled so that activations stay
O(1), and a small byte-level BPE vocabulary fixed here (so tokenizer tests can reason about it).
:func:`write_tiny` does the same for the other architectures quantref runs (``qwen2``,
``qwen3``, ``phi3``, ``gemma3``), with the tensors llama.cpp's converter (convert_hf_to_gguf.py)
writes for each: Q/K/V biases, Q/K norms, fused ``attn_qkv`` and gate|up ``ffn_up``, the
post-norms and sliding-window keys. The vocabulary:

    ids 0, 1, 2       ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (CONTROL)
    ids 3 .. 258      GPT-2's ``bytes_to_unicode`` symbol of byte 0 .. 255, in byte order (NORMAL)
    ids 259 ..        the merged tokens of :data:`MERGES`, in merge-rank order (NORMAL)

bos = eos = 0 (as SmolLM2's ``<|endoftext|>``), the chat template is SmolLM2's ChatML template.
Weights are quantized with ``gguf.quants`` (llama.cpp's reference quantizers), 1-D tensors stay
F32 as llama.cpp keeps them. The same arguments and seed always give the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType
from gguf import quants as gguf_quants

from .gguf import write

__all__ = [
    "bytes_to_unicode",
    "BYTE_TO_UNICODE",
    "SPECIAL_TOKENS",
    "BYTE_TOKENS",
    "MERGES",
    "MERGED_TOKENS",
    "TOKENS",
    "TOKEN_TYPES",
    "VOCAB_SIZE",
    "BOS_ID",
    "EOS_ID",
    "FIRST_BYTE_ID",
    "FIRST_MERGED_ID",
    "TOKEN_TYPE_NORMAL",
    "TOKEN_TYPE_CONTROL",
    "CHAT_TEMPLATE",
    "QTYPES",
    "write_tiny_llama",
    "write_tiny",
    "TINY_ARCHITECTURES",
    "tiny_llama_tensor_shapes",
    "random_model",
    "SMOLLM2_135M_SHAPES",
]

TOKEN_TYPE_NORMAL = 1  # llama.cpp's LLAMA_TOKEN_TYPE_NORMAL
TOKEN_TYPE_CONTROL = 3  # LLAMA_TOKEN_TYPE_CONTROL


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE.

    Bytes that are printable Latin-1 characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to
    themselves; the other 68 bytes, in increasing order, map to U+0100, U+0101, ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    next_cp = 256
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(next_cp)
            next_cp += 1
    return dict(sorted(mapping.items()))


BYTE_TO_UNICODE: dict[int, str] = bytes_to_unicode()
SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BYTE_TOKENS: tuple[str, ...] = tuple(BYTE_TO_UNICODE[b] for b in range(256))
# Merge rules in rank order ("Ġ" is the space byte); each merged token is a new id.
MERGES: tuple[str, ...] = ("Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "r e")
MERGED_TOKENS: tuple[str, ...] = tuple(m.replace(" ", "") for m in MERGES)
TOKENS: tuple[str, ...] = SPECIAL_TOKENS + BYTE_TOKENS + MERGED_TOKENS
TOKEN_TYPES: tuple[int, ...] = (TOKEN_TYPE_CONTROL,) * len(SPECIAL_TOKENS) + (TOKEN_TYPE_NORMAL,) * (
    len(BYTE_TOKENS) + len(MERGED_TOKENS)
)
VOCAB_SIZE = len(TOKENS)  # 267
BOS_ID = EOS_ID = 0
FIRST_BYTE_ID = len(SPECIAL_TOKENS)  # id of byte 0
FIRST_MERGED_ID = FIRST_BYTE_ID + 256  # id of MERGED_TOKENS[0]

# SmolLM2-135M-Instruct's template, byte for byte (ChatML with a default system prompt; the
# newlines are literal characters inside the Jinja string literals, as in the real file).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# qtype name -> (tensor type, llama.cpp file type): the types gguf.quants can quantize.
QTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q5_0": (GGMLQuantizationType.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (GGMLQuantizationType.Q5_1, LlamaFileType.MOSTLY_Q5_1),
}


TINY_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma3")


def tiny_llama_tensor_shapes(
    *, n_layers: int, dim: int, n_heads: int, n_kv_heads: int, hidden_dim: int,
    tied_embeddings: bool = True, rope_freqs: bool = False, vocab_size: int = VOCAB_SIZE,
    arch: str = "llama", head_dim: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """Tensor name -> NumPy shape, in the order llama.cpp's converter writes a model of ``arch``
    (HF's parameter order per layer, renamed).

    Linear weights are [out_features, in_features]; norms are [dim]; Q/K norms [head_dim].
    """
    head_dim = head_dim or dim // n_heads
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab_size, dim)}
    if rope_freqs:
        shapes["rope_freqs.weight"] = (head_dim // 2,)
    for i in range(n_layers):
        p = f"blk.{i}."
        shapes[p + "attn_norm.weight"] = (dim,)
        if arch == "phi3":  # Phi3ForCausalLM: qkv_proj and gate_up_proj, kept fused
            shapes[p + "ffn_down.weight"] = (dim, hidden_dim)
            shapes[p + "ffn_up.weight"] = (2 * hidden_dim, dim)
            shapes[p + "ffn_norm.weight"] = (dim,)
            shapes[p + "attn_output.weight"] = (dim, q_dim)
            shapes[p + "attn_qkv.weight"] = (q_dim + 2 * kv_dim, dim)
            continue
        shapes[p + "ffn_down.weight"] = (dim, hidden_dim)
        shapes[p + "ffn_gate.weight"] = (hidden_dim, dim)
        shapes[p + "ffn_up.weight"] = (hidden_dim, dim)
        if arch == "gemma3":
            shapes[p + "post_attention_norm.weight"] = (dim,)
            shapes[p + "post_ffw_norm.weight"] = (dim,)
        shapes[p + "ffn_norm.weight"] = (dim,)
        if arch == "qwen2":
            shapes[p + "attn_k.bias"] = (kv_dim,)
        shapes[p + "attn_k.weight"] = (kv_dim, dim)
        if arch in ("qwen3", "gemma3"):
            shapes[p + "attn_k_norm.weight"] = (head_dim,)
        shapes[p + "attn_output.weight"] = (dim, q_dim)
        if arch == "qwen2":
            shapes[p + "attn_q.bias"] = (q_dim,)
        shapes[p + "attn_q.weight"] = (q_dim, dim)
        if arch in ("qwen3", "gemma3"):
            shapes[p + "attn_q_norm.weight"] = (head_dim,)
        if arch == "qwen2":
            shapes[p + "attn_v.bias"] = (kv_dim,)
        shapes[p + "attn_v.weight"] = (kv_dim, dim)
    if not tied_embeddings:
        shapes["output.weight"] = (vocab_size, dim)
    shapes["output_norm.weight"] = (dim,)
    return shapes


def write_tiny_llama(path: str | os.PathLike[str], **options: Any) -> Path:
    """A tiny random Llama GGUF: :func:`write_tiny` with ``arch="llama"``."""
    return write_tiny(path, arch="llama", **options)


def write_tiny(
    path: str | os.PathLike[str],
    *,
    arch: str = "llama",
    n_layers: int = 2,
    dim: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    hidden_dim: int = 160,
    context_length: int = 256,
    qtype: str = "f32",
    embedding_qtype: str | None = None,
    tied_embeddings: bool = True,
    rope_freqs: bool = False,
    rope_base: float = 10000.0,
    norm_eps: float = 1e-5,
    seed: int = 0,
    add_bos: bool = False,
    chat_template: str = CHAT_TEMPLATE,
    head_dim: int | None = None,
    sliding_window: int = 0,
    sliding_window_pattern: int = 0,
) -> Path:
    """Write a random GGUF of ``arch`` (one of :data:`TINY_ARCHITECTURES`) with the fixed tiny
    vocabulary; returns ``Path(path)``.

    qtype: type of the 2-D weights ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0",
        "q5_1"); 1-D tensors (norms, rope_freqs) are always F32.
    embedding_qtype: type of ``token_embd.weight`` (default: ``qtype``), e.g. "q8_0" with
        qtype "q4_1" as in the default SmolLM2 model.
    Weights: normal, std 1/sqrt(in_features) (so each projection keeps activations O(1); the
    embedding uses 1/sqrt(dim) so that tied logits are O(1)); norm weights 1 + N(0, 0.1^2);
    rope_freqs factors uniform in [1, 4) (Llama-3-style long-context factors are >= 1); Q/K/V
    biases N(0, 0.1^2).
    head_dim: ``{arch}.attention.key_length`` / ``value_length`` when given (else dim/n_heads).
    sliding_window, sliding_window_pattern: gemma3's window and its every-n-th-layer-global
    pattern (the keys written only when non-zero; llama.cpp's default pattern is 6).
    chat_template: the ``tokenizer.chat_template`` text (default: a ChatML template).
    """
    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"arch must be one of {TINY_ARCHITECTURES}, got {arch!r}")
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {sorted(QTYPES)}, got {qtype!r}")
    embedding_qtype = qtype if embedding_qtype is None else embedding_qtype
    if embedding_qtype not in QTYPES:
        raise ValueError(f"embedding_qtype must be one of {sorted(QTYPES)}, got {embedding_qtype!r}")
    if (head_dim is None and dim % n_heads) or n_heads % n_kv_heads \
            or (head_dim or dim // n_heads) % 2:
        raise ValueError(f"dim {dim} must split into n_heads {n_heads} even-sized heads, "
                         f"and n_heads into n_kv_heads {n_kv_heads} groups")
    explicit_head_dim = head_dim is not None
    head_dim = head_dim or dim // n_heads
    weight_type, file_type = QTYPES[qtype]
    embd_type = QTYPES[embedding_qtype][0]

    metadata: dict[str, Any] = {}
    types: dict[str, Any] = {}

    def put(key: str, value: Any, vtype: Any) -> None:
        metadata[key] = value
        types[key] = vtype

    U32, F32, STR, BOOL, ARR = (GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING,
                                GGUFValueType.BOOL, GGUFValueType.ARRAY)
    put("general.architecture", arch, STR)
    put("general.type", "model", STR)
    # not "...Phi3": llama.cpp sets token attributes by model name and would look for "</s>"
    put("general.name", "Tiny Random Llama" if arch == "llama" else "Tiny Random Model", STR)
    put(f"{arch}.block_count", n_layers, U32)
    put(f"{arch}.context_length", context_length, U32)
    put(f"{arch}.embedding_length", dim, U32)
    put(f"{arch}.feed_forward_length", hidden_dim, U32)
    put(f"{arch}.attention.head_count", n_heads, U32)
    put(f"{arch}.attention.head_count_kv", n_kv_heads, U32)
    put(f"{arch}.rope.freq_base", float(np.float32(rope_base)), F32)
    put(f"{arch}.attention.layer_norm_rms_epsilon", float(np.float32(norm_eps)), F32)
    if explicit_head_dim:
        put(f"{arch}.attention.key_length", head_dim, U32)
        put(f"{arch}.attention.value_length", head_dim, U32)
    if sliding_window:
        put(f"{arch}.attention.sliding_window", sliding_window, U32)
    if sliding_window_pattern:
        put(f"{arch}.attention.sliding_window_pattern", sliding_window_pattern, U32)
    put("general.file_type", int(file_type), U32)
    put(f"{arch}.vocab_size", VOCAB_SIZE, U32)
    put(f"{arch}.rope.dimension_count", head_dim, U32)
    put("tokenizer.ggml.add_space_prefix", False, BOOL)
    put("tokenizer.ggml.add_bos_token", bool(add_bos), BOOL)
    put("tokenizer.ggml.add_eos_token", False, BOOL)
    put("tokenizer.ggml.model", "gpt2", STR)
    put("tokenizer.ggml.pre", "smollm", STR)
    put("tokenizer.ggml.tokens", list(TOKENS), (ARR, STR))
    put("tokenizer.ggml.token_type", list(TOKEN_TYPES), (ARR, GGUFValueType.INT32))
    put("tokenizer.ggml.merges", list(MERGES), (ARR, STR))
    put("tokenizer.ggml.bos_token_id", BOS_ID, U32)
    put("tokenizer.ggml.eos_token_id", EOS_ID, U32)
    put("tokenizer.ggml.unknown_token_id", 0, U32)
    put("tokenizer.ggml.padding_token_id", 2, U32)
    put("tokenizer.chat_template", chat_template, STR)
    put("general.quantization_version", 2, U32)

    shapes = tiny_llama_tensor_shapes(
        n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=hidden_dim,
        tied_embeddings=tied_embeddings, rope_freqs=rope_freqs, arch=arch,
        head_dim=head_dim if explicit_head_dim else None,
    )
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        if name == "rope_freqs.weight":
            values = rng.uniform(1.0, 4.0, size=shape)
        elif name.endswith(".bias"):
            values = 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            values = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name in ("token_embd.weight", "output.weight"):
            values = rng.standard_normal(shape) / np.sqrt(dim)
        else:
            values = rng.standard_normal(shape) / np.sqrt(shape[-1])
        values = values.astype(np.float32)
        if len(shape) == 1:
            t = GGMLQuantizationType.F32
        elif name == "token_embd.weight":
            t = embd_type
        else:
            t = weight_type
        encoded = gguf_quants.quantize(values, t)
        tensors[name] = (encoded, t, shape)
    return write(path, metadata, types, tensors)


# SmolLM2-135M's shapes: what `random_model()` builds by default, for benchmarks on machines
# that a model file cannot reach.
SMOLLM2_135M_SHAPES = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                           head_dim=64, hidden_dim=1536, norm_eps=1e-5, rope_base=100000.0,
                           rope_dim=64, rope_scale=1.0, max_seq_len=8192, tied_embeddings=True)


def random_model(seed: int = 0, **shapes: Any):
    """A :class:`quantref.Model` with random float32 weights (std 1/sqrt(fan_in)), no file and
    no tokenizer: SmolLM2-135M's shapes unless ``shapes`` override them."""
    from .model import LayerWeights, Model, ModelArgs, Weights

    a = ModelArgs(**{**SMOLLM2_135M_SHAPES, **shapes})
    rng = np.random.default_rng(seed)

    def w(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(a.dim)).astype(np.float32)

    q_dim, kv_dim = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    layers = [LayerWeights(attn_norm=norm(), wq=w(q_dim, a.dim), wk=w(kv_dim, a.dim),
                           wv=w(kv_dim, a.dim), wo=w(a.dim, q_dim), ffn_norm=norm(),
                           w_gate=w(a.hidden_dim, a.dim), w_up=w(a.hidden_dim, a.dim),
                           w_down=w(a.dim, a.hidden_dim)) for _ in range(a.n_layers)]
    embd = w(a.vocab_size, a.dim) * np.float32(np.sqrt(a.dim) / 4)
    weights = Weights(token_embd=embd, layers=layers, output_norm=norm(),
                      output=embd if a.tied_embeddings else w(a.vocab_size, a.dim))
    return Model(a, weights)
