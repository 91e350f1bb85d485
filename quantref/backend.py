"""Which engine ``--backend auto`` runs: a rule on the model's size and the device, derived from
``bench/crossover.py``'s table (``docs/benchmarks.md``, "Where the GPU wins").

Decoding one token reads every weight once, so a decode step's cost grows with the parameter
count, while the fixed costs (Python building the step's graph, MLX encoding it, one kernel
launch per operation, reading the token back) do not. Small models are bound by the fixed costs,
large ones by memory bandwidth; where an engine's fixed costs stop mattering is where it wins.
The rule compares the parameter count (every tensor's elements, as ``quantref info`` counts
them: the decode step reads each once, the tied embedding included) with named thresholds per
device:

- no MLX (``device="none"``): NumPy, the only engine there;
- CPU only (``"cpu"``: MLX without a GPU): MLX's CPU engine at or above
  :data:`CPU_MLX_MIN_PARAMS` parameters, else NumPy;
- CUDA GPU (``"cuda"``): MLX at or above :data:`CUDA_MLX_MIN_PARAMS`, else NumPy; MLX's step is
  the persistent one (one launch per token) up to :data:`CUDA_PERSISTENT_MAX_PARAMS`
  parameters, the fused kernels above;
- Apple GPU (``"metal"``): MLX at or above :data:`METAL_MLX_MIN_PARAMS` (the plain graph: the
  fused kernels are CUDA's only).

``None`` for a threshold means "never". A model of unknown size is treated as one of
:data:`UNKNOWN_PARAMS` parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Choice", "choose_backend", "detect_device", "n_params_of", "DEVICES",
           "CPU_MLX_MIN_PARAMS", "CUDA_MLX_MIN_PARAMS", "CUDA_PERSISTENT_MAX_PARAMS",
           "METAL_MLX_MIN_PARAMS", "UNKNOWN_PARAMS"]

DEVICES = ("cuda", "metal", "cpu", "none")

# CPU only: never MLX. On the 2-core AMD EPYC (bench/crossover.py, docs/benchmarks.md "Where
# the GPU wins") NumPy prefilled 4-27x faster than MLX's CPU engine at 135M and 360M parameters,
# and decoded 2.2-2.5x faster with one BLAS thread (2x slower with two on the loaded machine,
# OpenBLAS's threads waiting on each other); section 4's quiet run: NumPy decoded 2x faster
# even with OpenBLAS preloaded under MLX. Both read float32 weights on the CPU, so nothing
# in a larger model favours MLX there.
CPU_MLX_MIN_PARAMS: int | None = None

# CUDA GPU: MLX at every size. On the H200 lease of 2026-11-29 (docs/benchmarks.md "Where the
# GPU wins"), at the smallest shape, SmolLM2-135M, NumPy on the host's 16 cores decoded 34
# tokens/s and MLX's fused step 880 (the persistent step 1,308): the GPU wins from the smallest
# model up, and its lead grows with the bytes a token reads.
CUDA_MLX_MIN_PARAMS: int | None = 0
# The persistent step (its rows form) up to the largest shape measured where it runs: it beat
# the fused step at 135M (1.49x), 362M (1.36x) and 1,236M (1.69x) parameters, at context 128 in
# the same run. Llama-3.2-3B (head_dim 128) is outside its scope; above this, the fused step
# (where its kernels launch, else the plain graph: quantref_mlx.fused_decode.launchable).
CUDA_PERSISTENT_MAX_PARAMS: int | None = 1_300_000_000

# Apple GPU: not measured here; MLX at every size, as before this rule.
METAL_MLX_MIN_PARAMS: int | None = 0

# A model whose size is not known (no file to count): as SmolLM2-135M, the default model.
UNKNOWN_PARAMS = 134_515_008


@dataclass(frozen=True)
class Choice:
    """What ``--backend auto`` runs: ``backend`` ``"numpy"`` or ``"mlx"``; ``step`` the MLX
    decode step (``"persistent"``, ``"fused"``, ``"plain"``; None with NumPy); ``why`` one line
    naming the rule's threshold that decided."""

    backend: str
    step: str | None
    why: str


def _at_least(n: int, threshold: int | None) -> bool:
    return threshold is not None and n >= threshold


def _millions(n: int | None) -> str:
    """A threshold as the rule's reasons print it: ``135M``, ``1,000`` or ``never``."""
    if n is None:
        return "never"
    return f"{n / 1e6:,.0f}M" if n >= 1_000_000 else f"{n:,}"


def choose_backend(n_params: int | None, device: str) -> Choice:
    """The engine for a model of ``n_params`` parameters (None: unknown, taken as
    :data:`UNKNOWN_PARAMS`) on ``device`` (one of :data:`DEVICES`; see :func:`detect_device`).
    Raises ValueError for another device or a negative count."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    n = UNKNOWN_PARAMS if n_params is None else int(n_params)
    if n < 0:
        raise ValueError(f"n_params must be >= 0, got {n_params}")
    size = f"{_millions(n)} parameters" + (" (size unknown)" if n_params is None else "")
    if device == "none":
        return Choice("numpy", None, "MLX is not installed")
    if device == "cpu":
        if _at_least(n, CPU_MLX_MIN_PARAMS):
            return Choice("mlx", "plain", f"CPU only, {size} >= CPU_MLX_MIN_PARAMS "
                          f"({_millions(CPU_MLX_MIN_PARAMS)})")
        return Choice("numpy", None, f"CPU only, {size}: MLX's CPU engine from "
                      f"CPU_MLX_MIN_PARAMS ({_millions(CPU_MLX_MIN_PARAMS)})")
    if device == "metal":
        if _at_least(n, METAL_MLX_MIN_PARAMS):
            return Choice("mlx", "plain", f"Apple GPU, {size} >= METAL_MLX_MIN_PARAMS "
                          f"({_millions(METAL_MLX_MIN_PARAMS)})")
        return Choice("numpy", None, f"Apple GPU, {size} < METAL_MLX_MIN_PARAMS "
                      f"({_millions(METAL_MLX_MIN_PARAMS)})")
    if not _at_least(n, CUDA_MLX_MIN_PARAMS):
        return Choice("numpy", None, f"CUDA GPU, {size}: MLX from CUDA_MLX_MIN_PARAMS "
                      f"({_millions(CUDA_MLX_MIN_PARAMS)})")
    if CUDA_PERSISTENT_MAX_PARAMS is not None and n <= CUDA_PERSISTENT_MAX_PARAMS:
        return Choice("mlx", "persistent", f"CUDA GPU, {size} <= CUDA_PERSISTENT_MAX_PARAMS "
                      f"({_millions(CUDA_PERSISTENT_MAX_PARAMS)})")
    return Choice("mlx", "fused", f"CUDA GPU, {size} >= CUDA_MLX_MIN_PARAMS "
                  f"({_millions(CUDA_MLX_MIN_PARAMS)}); the persistent step up to "
                  f"CUDA_PERSISTENT_MAX_PARAMS "
                  f"({_millions(CUDA_PERSISTENT_MAX_PARAMS)})")


def detect_device() -> str:
    """This machine's device as :func:`choose_backend` names it: ``"none"`` when MLX does not
    import, ``"cuda"`` / ``"metal"`` when MLX's default device is that GPU, else ``"cpu"``."""
    try:
        import mlx.core as mx
    except ImportError:
        return "none"
    if mx.default_device().type != mx.DeviceType.gpu:
        return "cpu"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "metal"


def n_params_of(path: str | Path) -> int:
    """A GGUF's parameter count: the sum of its tensors' elements (the header only is read)."""
    from . import gguf

    with gguf.read(path) as gf:
        return sum(t.n_elements for t in gf.tensors.values())
