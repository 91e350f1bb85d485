"""quantref_mlx: the quantref graph in MLX, evaluated lazily (one mx.eval per step)."""

__version__ = "0.1.0"
