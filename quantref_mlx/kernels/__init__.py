"""The CUDA (and, for turbo_kv, Metal) kernel sources, one file per kernel, read at import.

Each ``.cu`` file is the *body* of one ``mx.fast.cuda_kernel`` (MLX writes the signature from the
input and output names; see the comment that opens each file for its grid, block, inputs and
outputs with shapes and dtypes); ``.cuh`` files are the headers they share. The kernels are
used by :mod:`quantref_mlx.fused_decode` and :mod:`quantref_mlx.turbo_kv`;
``tools/nvrtc_check.py`` compiles every one of them with NVRTC, without a GPU.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SOURCES", "source"]

_DIR = Path(__file__).resolve().parent
SOURCES: dict[str, str] = {p.name: p.read_text() for p in sorted(_DIR.iterdir())
                           if p.suffix in (".cu", ".cuh")}


def source(name: str) -> str:
    """The text of kernel file ``name`` (e.g. ``"attend.cu"``)."""
    try:
        return SOURCES[name]
    except KeyError:
        raise KeyError(f"no kernel source {name!r}; have {sorted(SOURCES)}") from None
