"""quantref_mlx: quantref's graph in MLX, evaluated lazily (one ``mx.eval`` per step).

Mirrors :mod:`quantref` module for module and name for name::

    m = quantref_mlx.load()                  # the default model, weights kept quantized
    r = quantref_mlx.perplexity(m, text, kv="turbo_kv_4b")
"""

__version__ = "0.1.0"

import os as _os

# MLX runs float32 matmuls in TF32 on CUDA (and on Apple M5) unless told otherwise, which moves
# attention scores by ~4e-4 of their scale: too much for an engine checked against a float32
# oracle. Off unless the user has chosen (it must be set before MLX's first matmul).
_os.environ.setdefault("MLX_ENABLE_TF32", "0")

from .cache import KV_TYPES, KVCache, make_cache
from .model import Model, ModelArgs, load
from .generate import GenerationResponse, generate, stream_generate
from .perplexity import PerplexityResult, default_text, kl_divergence, perplexity

__all__ = [
    "GenerationResponse",
    "generate",
    "stream_generate",
    "KVCache",
    "KV_TYPES",
    "Model",
    "ModelArgs",
    "PerplexityResult",
    "default_text",
    "kl_divergence",
    "load",
    "make_cache",
    "perplexity",
]
