"""quantref_mlx.turbo_kv on the GPU and the CPU against the NumPy oracle, in one run.

    PYTHONPATH=. python bench/turbo_kv_gpu_check.py [--n 100000] [--seed 0]

Made for a GPU machine (MLX's CUDA backend, or Metal), where it compares three columns with
``quantref.turbo_kv``: ``cpu`` (MLX operations on the CPU stream), ``gpu`` (what
``quantref_mlx.turbo_kv`` runs on the GPU: the custom kernels for keys, MLX operations for
scores and values) and ``gpu-ops`` (the CPU's MLX-operation graph evaluated on the GPU, for
information: it shows whether the GPU's own operations round like the CPU's). Without a GPU
only the ``cpu`` column is filled.

It reports, per kind: the fraction of byte-identical blocks and of bit-identical dequantized
values on quant.cpp's golden vectors and on ``--n`` random vectors of d = 64 and d = 128 (a
quarter each: Gaussian of random scale, outlier channels, tiny scales whose squares are
subnormal or underflow, huge scales whose squares overflow; every 97th vector zero), the score
error of each path, the value formats, and quantize / dequantize throughput (vectors/s) per
column. A kernel that fails to compile or run is reported and the run goes on. Exit status 1
when anything that must be identical is not, or a score is off by more than 1e-5 of its row's
largest score (the golden tolerance).

MLX runs float32 matmuls in TF32 on CUDA (and on Apple M5) unless ``MLX_ENABLE_TF32=0``; this
script sets it to 0 unless the environment says otherwise (``MLX_ENABLE_TF32=1 python ...``
shows the TF32 score errors, about 4e-4 of the row maximum on an H100).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

# MLX's CUDA backend (and Apple M5 GPUs) run float32 matmuls in TF32 unless this is 0; it is
# read once, at the first matmul. TF32 puts scores ~4e-4 of the row maximum off (H100).
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from _common import best_of  # noqa: E402 (bench/ is the script folder)
from quantref import turbo_kv as tk  # noqa: E402
from quantref_mlx import turbo_kv as mk  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KINDS = tk.KINDS
SCORE_KEYS, SCORE_QUERIES = 4096, 8
FAILURES: list[str] = []
SEEN_ERRORS: set[str] = set()


def gpu_backend() -> str | None:
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


def columns(backend: str | None) -> list[str]:
    return ["cpu"] + (["gpu", "gpu-ops"] if backend else [])


def device_of(column: str):
    return mx.cpu if column == "cpu" else mx.gpu


def run_on(column: str, fn, *args):
    """Build ``fn(*args)`` with the column's device as default and evaluate it there."""
    with mx.stream(device_of(column)):
        out = fn(*[mx.array(a) if isinstance(a, np.ndarray) else a for a in args])
        mx.eval(out)
    return np.array(out)


def quantize_fn(column: str):
    return mk._quantize_ops if column == "gpu-ops" else mk.quantize


def dequantize_fn(column: str):
    return mk._dequantize_ops if column == "gpu-ops" else mk.dequantize


def same_floats(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per element: the same float32 bits (any NaN matches any NaN: payloads are not data)."""
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def attempt(label: str, fn):
    """``fn()``, or None after printing why it failed (a kernel that does not compile, ...)."""
    try:
        return fn()
    except Exception as e:  # report and go on: one run should tell everything
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"    {label}: ERROR {type(e).__name__}: {first[:300]}")
        if first not in SEEN_ERRORS:  # the whole message and where, once per distinct error
            SEEN_ERRORS.add(first)
            more = str(e).strip().splitlines()[1:40]
            if more:
                print("      " + "\n      ".join(more))
            print("      " + "\n      ".join(traceback.format_exc().strip().splitlines()[-6:]))
        FAILURES.append(f"{label}: {type(e).__name__}")
        return None


def pct(ok: np.ndarray) -> str:
    return f"{100.0 * ok.mean():8.3f}%" if ok.size else "     n/a"


def check_identity(label: str, ok: np.ndarray) -> None:
    if ok.size and not ok.all():
        FAILURES.append(f"{label}: {int((~ok).sum())} of {ok.size} differ")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def random_keys(n: int, d: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``float32 [n, d]`` keys and their distribution name per row (see the module docstring)."""
    names = np.array(["normal", "outliers", "tiny", "huge"])
    which = np.arange(n) * 4 // n
    x = rng.standard_normal((n, d))
    scale = np.exp(rng.uniform(-4, 4, n))
    scale[which == 2] = 10.0 ** rng.uniform(-44, -15, (which == 2).sum())
    scale[which == 3] = 10.0 ** rng.uniform(15, 38, (which == 3).sum())
    outliers = np.flatnonzero(which == 1)
    cols = rng.integers(0, d, (outliers.size, max(1, d // 32)))
    x[outliers[:, None], cols] = 40.0 * np.sign(rng.standard_normal(cols.shape))
    with np.errstate(over="ignore"):
        x = (x * scale[:, None]).astype(np.float32)
    x[~np.isfinite(x)] = np.float32(3e38)
    x[::97] = 0.0
    return x, names[which]


def golden_files() -> list[Path]:
    files = [ROOT / "tests" / "data" / "turbo_kv_golden.npz"]
    shared = Path(os.environ.get("QUANTREF_SHARED", ROOT.parent / "shared"))
    files.append(shared / "golden" / "turbo_kv_golden_realkv.npz")
    return files


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

def score_errors(column: str, q: np.ndarray, blocks: np.ndarray, kind: str, d: int,
                 refs: dict[str, np.ndarray]) -> dict[str, float | None]:
    """max |score - reference| / (largest |reference| of the row), per path."""
    out = {}
    for path, ref in refs.items():
        got = attempt(f"{column} scores {kind} {path}",
                      lambda: run_on(column, lambda a, b: mk.scores(a, b, kind, d, path),
                                     q, blocks[:, None] if blocks.ndim == 2 else blocks))
        if got is None:
            out[path] = None
            continue
        scale = np.max(np.abs(ref), axis=-1, keepdims=True)
        out[path] = float(np.max(np.abs(got.astype(np.float64) - ref) / scale))
        if out[path] > 1e-5:  # the golden tolerance of the oracle (docs/oracle.md)
            FAILURES.append(f"{column} scores {kind} {path}: {out[path]:.1e} of the row maximum")
    return out


def fmt_err(e) -> str:
    return "   error" if e is None else "       -" if e == "-" else f"{e:8.1e}"


def check_golden(cols: list[str]) -> None:
    for path in golden_files():
        print(f"\n== golden vectors of quant.cpp: {path}")
        if not path.exists():
            print("   (absent: skipped)")
            continue
        print(f"   {'case':<22}{'kind':<13}{'column':<9}{'blocks':>10}{'dequant':>10}"
              f"   scores vs golden (max err / row max): int8 / fp32 / dequant")
        with np.load(path) as z:
            cases = sorted({k.split("/")[0] for k in z.files})
            data = {k: z[k] for k in z.files}
        for case in cases:
            keys, queries = data[f"{case}/keys"], data[f"{case}/queries"]
            d = keys.shape[1]
            for kind in KINDS:
                gold = data[f"{case}/{kind}/blocks"]
                gold_deq = data[f"{case}/{kind}/dequant"]
                refs = {
                    "int8_codebook": data[f"{case}/{kind}/scores_int8_codebook"].astype(np.float64),
                    "fp32_codebook": data[f"{case}/{kind}/scores_fp32_codebook"].astype(np.float64),
                    "dequant": queries.astype(np.float64) @ gold_deq.astype(np.float64).T,
                }
                oracle_ok = np.array_equal(tk.quantize(keys, kind)[:, 0], gold)
                if not oracle_ok:
                    FAILURES.append(f"oracle golden {case} {kind}")
                for col in cols:
                    label = f"{col} golden {case} {kind}"
                    blocks = attempt(label + " quantize",
                                     lambda: run_on(col, lambda a: quantize_fn(col)(a, kind), keys))
                    deq = attempt(label + " dequantize", lambda: run_on(
                        col, lambda b: dequantize_fn(col)(b, kind, d), gold[:, None]))
                    b_ok = (blocks[:, 0] == gold).all(axis=1) if blocks is not None \
                        else np.zeros(0, bool)
                    d_ok = same_floats(deq, gold_deq).all(axis=1) if deq is not None \
                        else np.zeros(0, bool)
                    check_identity(label + " blocks", b_ok)
                    check_identity(label + " dequant", d_ok)
                    errs = score_errors(col, queries, gold[:, None], kind, d, refs) \
                        if col != "gpu-ops" else {p: "-" for p in refs}
                    print(f"   {case:<22}{kind:<13}{col:<9}{b_ok.sum():>5}/{len(keys):<4}"
                          f"{d_ok.sum():>5}/{len(keys):<4}   "
                          + " / ".join(fmt_err(errs[p]) for p in refs))


def timed(fn, repeat: int = 2) -> float:
    """Best wall time of ``fn()`` (which evaluates); the identity check before it warmed up."""
    return best_of(fn, repeat)


def throughput(col: str, x: np.ndarray, blocks: np.ndarray, kind: str) -> tuple[str, str]:
    """Vectors/s of quantize and dequantize on the column's device (inputs already there)."""
    d = x.shape[1]

    def seconds(fn, arg) -> float:
        with mx.stream(device_of(col)):
            a = mx.array(arg)
            mx.eval(a)
            return timed(lambda: mx.eval(fn(a)))

    tq = attempt(f"{col} timing quantize {kind}",
                 lambda: seconds(lambda a: quantize_fn(col)(a, kind), x))
    td = attempt(f"{col} timing dequantize {kind}",
                 lambda: seconds(lambda b: dequantize_fn(col)(b, kind, d), blocks))
    return tuple("     n/a" if t is None else f"{len(x) / t:8.2e}" for t in (tq, td))


def check_random(cols: list[str], n: int, rng: np.random.Generator) -> None:
    for d in (64, 128):
        x, dist = random_keys(n, d, rng)
        print(f"\n== random keys, d={d}, n={n} (normal, outliers, tiny, huge; zeros)")
        print(f"   {'kind':<13}{'column':<9}{'blocks':>10}{'dequant':>10}"
              f"{'quantize/s':>12}{'dequant/s':>12}   mismatching distributions")
        normal = np.flatnonzero(dist == "normal")
        keys_for_scores = normal[:SCORE_KEYS]
        q = rng.standard_normal((SCORE_QUERIES, d)).astype(np.float32)
        for kind in KINDS:
            t0 = time.perf_counter()
            ref_blocks = tk.quantize(x, kind)
            t1 = time.perf_counter()
            ref_deq = tk.dequantize(ref_blocks, kind, d)
            t_oracle = (t1 - t0, time.perf_counter() - t1)
            sb = ref_blocks[keys_for_scores]
            refs = {p: tk.scores(q, sb, kind, d, p).astype(np.float64) for p in tk.PATHS}
            for col in cols:
                label = f"{col} random d={d} {kind}"
                blocks = attempt(label + " quantize",
                                 lambda: run_on(col, lambda a: quantize_fn(col)(a, kind), x))
                deq = attempt(label + " dequantize", lambda: run_on(
                    col, lambda b: dequantize_fn(col)(b, kind, d), ref_blocks))
                b_ok = (blocks == ref_blocks).all(axis=(1, 2)) if blocks is not None \
                    else np.zeros(0, bool)
                d_ok = same_floats(deq, ref_deq).all(axis=1) if deq is not None \
                    else np.zeros(0, bool)
                check_identity(label + " blocks", b_ok)
                check_identity(label + " dequant", d_ok)
                bad = sorted(set(dist[~b_ok]) | set(dist[~d_ok])) if b_ok.size and d_ok.size \
                    else []
                vq, vd = throughput(col, x, ref_blocks, kind)
                print(f"   {kind:<13}{col:<9}{pct(b_ok):>10}{pct(d_ok):>10}{vq:>12}{vd:>12}   "
                      f"{', '.join(bad) if bad else '-'}")
            print(f"   {kind:<13}{'oracle':<9}{'':>20}{len(x) / t_oracle[0]:12.2e}"
                  f"{len(x) / t_oracle[1]:12.2e}   (NumPy, one run)")
            score_cols = [c for c in cols if c != "gpu-ops"]  # scores are MLX operations
            errs = {col: score_errors(col, q, sb, kind, d, refs) for col in score_cols}
            for p in tk.PATHS:
                print(f"   {'':<13}scores {p:<14} max err / row max: "
                      + "  ".join(f"{col} {fmt_err(errs[col][p])}" for col in score_cols))


def check_values(cols: list[str], rng: np.random.Generator) -> None:
    print("\n== value formats (MLX operations on every column)")
    print(f"   {'v_type':<8}{'d':>5}  {'column':<9}{'bytes':>10}{'values':>10}")
    for d in (64, 128, 40):
        x = (rng.standard_normal((20000, d)) * np.exp(rng.uniform(-6, 6, (20000, 1))))
        x = x.astype(np.float32)
        x[1::7, :8] = np.arange(8) + np.float32(0.5)  # q4: exact halves (roundf ties)
        x[1::7, 8] = 7.0                              # ... when absmax = 7, dq = 1
        for v_type in tk.V_TYPES:
            ref = tk.quantize_v(x, v_type)
            ref_back = tk.dequantize_v(ref, v_type, d)
            for col in [c for c in cols if c != "gpu-ops"]:  # no kernel for values
                label = f"{col} values {v_type} d={d}"
                data = attempt(label + " quantize_v",
                               lambda: run_on(col, lambda a: mk.quantize_v(a, v_type), x))
                back = attempt(label + " dequantize_v",
                               lambda: run_on(col, lambda a: mk.dequantize_v(a, v_type, d), ref))
                b_ok = (data == ref).all(axis=1) if data is not None else np.zeros(0, bool)
                v_ok = same_floats(back, ref_back).all(axis=1) if back is not None \
                    else np.zeros(0, bool)
                check_identity(label + " bytes", b_ok)
                check_identity(label + " values", v_ok)
                print(f"   {v_type:<8}{d:>5}  {col:<9}{pct(b_ok):>10}{pct(v_ok):>10}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="random vectors per d")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    backend = gpu_backend()
    cols = columns(backend)
    t0 = time.perf_counter()
    print(f"MLX {mx.__version__}; GPU backend: {backend or 'none (cpu column only)'}; "
          f"MLX_ENABLE_TF32={os.environ['MLX_ENABLE_TF32']}")
    if backend:
        info = attempt("device_info", lambda: mx.device_info())
        if info:
            print(f"GPU: {info.get('device_name', info)}")
    rng = np.random.default_rng(args.seed)
    check_golden(cols)
    check_random(cols, args.n, rng)
    check_values(cols, rng)
    print(f"\n{time.perf_counter() - t0:.1f} s")
    # gpu-ops mismatches are information (the shipped GPU path is the kernel), not failures
    failures = [f for f in FAILURES if not f.startswith("gpu-ops")]
    info_only = [f for f in FAILURES if f.startswith("gpu-ops")]
    if info_only:
        print(f"gpu-ops (information only): {len(info_only)} item(s) differ, e.g. "
              + "; ".join(info_only[:4]))
    if failures:
        print(f"FAILED: {len(failures)} item(s):\n  " + "\n  ".join(failures[:40]))
        return 1
    print("OK: every block, dequantized key and value identical; scores within 1e-5 of the row "
          "maximum")
    return 0


if __name__ == "__main__":
    sys.exit(main())
