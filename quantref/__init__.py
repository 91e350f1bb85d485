"""quantref: a readable NumPy oracle for GGUF Llama models with a compressed KV cache.

    m = quantref.load()                      # the default model, fetched on first use
    ids = m.tokenizer.encode("Hello")
    logits = m.forward(ids)                  # float32 [len(ids), vocab]
    r = quantref.perplexity(m, text, kv="turbo_kv_4b")
"""

__version__ = "0.1.0"

from . import turbo_kv
from .cache import KV_TYPES, KVCache, make_cache
from .gguf import GGUFError
from .model import Model, ModelArgs, UnsupportedModelError, load
from .generate import GenerationResponse, generate, stream_generate
from .perplexity import PerplexityResult, default_text, kl_divergence, perplexity

__all__ = [
    "GenerationResponse",
    "generate",
    "stream_generate",
    "GGUFError",
    "KVCache",
    "KV_TYPES",
    "Model",
    "ModelArgs",
    "PerplexityResult",
    "UnsupportedModelError",
    "default_text",
    "kl_divergence",
    "load",
    "make_cache",
    "perplexity",
    "turbo_kv",
]
