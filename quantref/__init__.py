"""quantref: a readable NumPy oracle for GGUF Llama models with a compressed KV cache."""

__version__ = "0.1.0"
