"""The model size where the GPU wins: decode and prefill tokens/s of every engine over real model
shapes (SmolLM2-135M, SmolLM2-360M, Llama-3.2-1B, Llama-3.2-3B) with random 4-bit weights, in
one run; one table, ratios against MLX's default step measured in the same run, a plot.

    python bench/crossover.py                                   # every shape, every mode
    python bench/crossover.py --shapes smollm2-135m,smollm2-360m --modes numpy,mlx-op,mlx
    python bench/crossover.py --llama-bench B --json out.json --plot out.png
    python bench/crossover.py --mlx-device cpu --modes numpy,mlx   # the CPU-only case, any host
    python bench/crossover.py --from-json out.json --plot out.png  # table and plot of a run

For each shape one GGUF is written into a temporary folder (``--dir`` keeps and reuses them):
the real model's hyperparameters (its configuration file on the Hugging Face Hub), llama's tensor
names and layout, Q4_1 layer weights and a Q8_0 embedding as SmolLM2-135M-Instruct's own file
(``--qtype q4_0`` for Q4_0), tied output as all four models. Block bytes are drawn directly with
NumPy (random codes, one block scale per tensor chosen so that each projection keeps activations
of order one), so a 3B file takes seconds; llama.cpp's vocabulary checks are met by a byte-level
BPE vocabulary (quantref.testing's tiny one) padded with unreachable filler tokens up to the
real vocabulary size, which sets the logits' width. quantref (``quantref.load``,
``quantref_mlx.load``) and llama.cpp's ``llama-bench`` read the same file.

Modes (``--modes``):

- ``numpy``: the NumPy oracle on the host CPU (weights dequantized to float32 at load);
- ``mlx-op``: MLX with an evaluation after every operation (``sync="op"``, plain graph);
- ``mlx-plain``: MLX's lazy plain graph, built op by op, one evaluation per token;
- ``mlx``: ``quantref_mlx.generate.Decoder``'s default step: the fused CUDA kernels, compiled,
  on a CUDA GPU; the plain graph elsewhere (the ``step`` column says which ran);
- ``mlx-persistent``: ``Decoder(..., persistent=True)``, the one-launch step (issue 12), where
  this quantref has it; otherwise its row says why it was skipped;
- ``llama.cpp``: ``llama-bench`` on the same file (``--llama-bench PATH``), f16 KV cache, flash
  attention, every layer offloaded; its prefill is ``-p CTX`` tokens after a depth of CTX.

At context ``--ctx`` (default 128) a fresh ``--kv`` cache (default fp16) is prefilled with CTX
random tokens in one chunk (prefill tokens/s), then tokens are decoded greedily one at a time,
as generation runs them (``bench/decode_speed.py``'s ``run_numpy`` / ``run_mlx`` /
``timed_decode``, reused here). The number of decode steps adapts: a short probe run gives a
rate, then the timed run takes about ``--cap`` seconds (at most ``--steps``, at least the
probe's). Each MLX mode first runs once untimed at context 300 (so that the kernels of split
attention past 256 keys are compiled before any timed step). Ctrl-C stops the run and prints
the rows measured so far.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from inspect import signature
from pathlib import Path

import numpy as np

from _common import machine  # bench/ is the script's folder, so on sys.path
from decode_speed import DECODER, llama_bench, run_mlx, run_numpy

# The real models' hyperparameters: each config.json on the Hugging Face Hub
# (HuggingFaceTB/SmolLM2-135M, HuggingFaceTB/SmolLM2-360M, meta-llama/Llama-3.2-1B,
# meta-llama/Llama-3.2-3B). All four tie the output to the embedding. Llama 3.2's "llama3"
# RoPE scaling (a rope_freqs tensor of head_dim/2 factors) is left out: it changes no kernel's
# cost.
SHAPES = {
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                         vocab=49152, rope_base=100000.0),
    "smollm2-360m": dict(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560,
                         vocab=49152, rope_base=100000.0),
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                         vocab=128256, rope_base=500000.0),
    "llama-3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192,
                         vocab=128256, rope_base=500000.0),
}

MODES = ("numpy", "mlx-op", "mlx-plain", "mlx", "mlx-persistent", "mlx-persistent-rows",
         "llama.cpp")
# Decoder options per MLX mode: decode_speed.DECODER's (the persistent step's two forms too)
OPTIONS = {**DECODER, "mlx-persistent": dict(persistent="grid")}  # the fused form
SLOW = ("numpy", "mlx-op")  # a few steps are enough: tens of ms to seconds each

# ggml block layouts: (bytes per block of 32, llama.cpp file type)
BLOCK = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
FILE_TYPE = {"q4_0": 2, "q4_1": 3}  # LLAMA_FTYPE_MOSTLY_Q4_0 / _Q4_1


def random_blocks(rng: np.random.Generator, qtype: str, rows: int, cols: int) -> np.ndarray:
    """``uint8 [rows, cols/32 * block bytes]``: ``qtype`` blocks of random codes, each block's
    float16 scale ``d`` chosen so that the dequantized weights have standard deviation
    ~1/sqrt(cols) (a projection of ``cols`` inputs keeps activations of order one). Q4_0:
    ``(q - 8) d``, q uniform in 0..15 (std 4.6 d); Q4_1: ``q d + m`` with ``m = -8 d``, the
    same values; Q8_0: ``q d``, q uniform in -128..127 (std 74 d)."""
    size = BLOCK[qtype]
    nb = rows * (cols // 32)
    out = np.frombuffer(rng.bytes(nb * size), np.uint8).reshape(nb, size).copy()
    d = 1.0 / ((74.0 if qtype == "q8_0" else 4.6) * np.sqrt(cols))
    out[:, 0:2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
    if qtype == "q4_1":
        out[:, 2:4] = np.frombuffer(np.float16(-8 * d).tobytes(), np.uint8)
    return out.reshape(rows, -1)


def write_gguf(path: Path, shape: dict, qtype: str = "q4_1", seed: int = 0) -> Path:
    """A llama GGUF of ``shape`` (:data:`SHAPES`) with random ``qtype`` layer weights, a Q8_0
    tied embedding, F32 norms (1 + N(0, 0.1^2)), and the tiny byte-level vocabulary of
    :mod:`quantref.testing` padded to ``shape["vocab"]`` tokens. Written tensor by tensor (one
    in memory at a time)."""
    from gguf import GGMLQuantizationType, GGUFValueType

    from quantref import testing
    from quantref.gguf import write

    s = shape
    head_dim = s["dim"] // s["n_heads"]
    U32, F32, STR, BOOL, ARR, I32 = (GGUFValueType.UINT32, GGUFValueType.FLOAT32,
                                     GGUFValueType.STRING, GGUFValueType.BOOL,
                                     GGUFValueType.ARRAY, GGUFValueType.INT32)
    n_fill = s["vocab"] - len(testing.TOKENS)
    # unreachable by the merges and byte tokens: only the logits' width depends on them
    tokens = list(testing.TOKENS) + [f"[fill{i}]" for i in range(n_fill)]
    types_ = list(testing.TOKEN_TYPES) + [testing.TOKEN_TYPE_NORMAL] * n_fill
    meta = [
        ("general.architecture", "llama", STR), ("general.type", "model", STR),
        ("general.name", "Random Llama", STR),
        ("llama.block_count", s["n_layers"], U32), ("llama.context_length", 8192, U32),
        ("llama.embedding_length", s["dim"], U32),
        ("llama.feed_forward_length", s["hidden_dim"], U32),
        ("llama.attention.head_count", s["n_heads"], U32),
        ("llama.attention.head_count_kv", s["n_kv_heads"], U32),
        ("llama.rope.freq_base", s["rope_base"], F32),
        ("llama.attention.layer_norm_rms_epsilon", 1e-5, F32),
        ("general.file_type", FILE_TYPE[qtype], U32), ("llama.vocab_size", s["vocab"], U32),
        ("llama.rope.dimension_count", head_dim, U32),
        ("tokenizer.ggml.add_bos_token", False, BOOL),
        ("tokenizer.ggml.add_eos_token", False, BOOL),
        ("tokenizer.ggml.model", "gpt2", STR), ("tokenizer.ggml.pre", "smollm", STR),
        ("tokenizer.ggml.tokens", tokens, (ARR, STR)),
        ("tokenizer.ggml.token_type", types_, (ARR, I32)),
        ("tokenizer.ggml.merges", list(testing.MERGES), (ARR, STR)),
        ("tokenizer.ggml.bos_token_id", testing.BOS_ID, U32),
        ("tokenizer.ggml.eos_token_id", testing.EOS_ID, U32),
        ("general.quantization_version", 2, U32),
    ]
    metadata = {k: v for k, v, _ in meta}
    vtypes = {k: t for k, _, t in meta}

    rng = np.random.default_rng(seed)
    qt = GGMLQuantizationType[qtype.upper()]
    tensors = {}
    for name, shp in testing.tiny_llama_tensor_shapes(
            n_layers=s["n_layers"], dim=s["dim"], n_heads=s["n_heads"],
            n_kv_heads=s["n_kv_heads"], hidden_dim=s["hidden_dim"],
            vocab_size=s["vocab"]).items():
        if len(shp) == 1:
            tensors[name] = (lambda n=shp[0]: (1 + 0.1 * rng.standard_normal(n))
                             .astype(np.float32), GGMLQuantizationType.F32, shp)
        elif name == "token_embd.weight":
            tensors[name] = (lambda r=shp[0], c=shp[1]: random_blocks(rng, "q8_0", r, c),
                             GGMLQuantizationType.Q8_0, shp)
        else:
            tensors[name] = (lambda r=shp[0], c=shp[1]: random_blocks(rng, qtype, r, c), qt, shp)
    return write(path, metadata, vtypes, tensors)


def n_params(path: Path) -> int:
    """Parameters of a GGUF (the sum of its tensors' elements, as ``quantref info``)."""
    from quantref import gguf

    with gguf.read(path) as gf:
        return sum(t.n_elements for t in gf.tensors.values())


def which_step(model, kv: str, mode: str) -> str:
    """What ``Decoder`` runs for ``mode``: fused / plain, compiled or not (the reason the fused
    step does not run, for ``mlx``)."""
    import mlx.core as mx

    from quantref_mlx.fused_decode import supported

    if mode == "mlx-op":
        return "plain, eval per op"
    if mode == "mlx-plain":
        return "plain"
    cache = model.make_cache(kv)
    mx.eval(model.forward([1], cache, last_only=True), cache.state())
    if mode.startswith("mlx-persistent"):  # raises here (not after a timed prefill) if it can't
        from quantref_mlx.generate import Decoder

        Decoder(model, cache, lambda logits: mx.argmax(logits, axis=-1), **OPTIONS[mode])
        return "persistent" + mode[len("mlx-persistent"):]
    why = supported(model, cache)
    return "fused, compiled" if why is None else f"plain ({why})"


def adaptive(run, probe: int, cap: float, most: int) -> tuple[float, float, int]:
    """(prefill, decode tokens/s, steps) of ``run(steps)``: a probe of ``probe`` steps gives the
    rate; when about ``cap`` seconds hold at least four times the probe's steps, a timed run of
    that many (at most ``most``) replaces it (each run prefills again: not worth it for less)."""
    prefill, decode = run(probe)
    steps = min(most, int(decode * cap))
    if steps >= 4 * probe:
        prefill, decode = run(steps)
        return prefill, decode, steps
    return prefill, decode, probe


def measure_shape(name: str, path: Path, args, bar) -> list[dict]:
    """Every requested mode on one shape's GGUF: rows of shape, params, mode, step, prefill,
    decode, steps (or error)."""
    rows: list[dict] = []
    params = n_params(path)
    base = dict(shape=name, params=params, ctx=args.ctx, kv=args.kv)

    def done(row):
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        bar.update(1)

    np_model = mlx_model = None
    if "numpy" in args.modes:
        import quantref

        bar.set_postfix_str(f"{name}: loading (NumPy)")
        np_model = quantref.load(path)
        bar.set_postfix_str(f"{name}: numpy")
        try:
            r = adaptive(lambda n: run_numpy(np_model, args.kv, args.ctx, n, args.chunk),
                         2, args.cap, args.steps)
            done(dict(base, mode="numpy", step="oracle", prefill=r[0], decode=r[1], steps=r[2]))
        except Exception as e:  # noqa: BLE001 - one failure must not lose the table
            done(dict(base, mode="numpy", step="oracle", error=f"{type(e).__name__}: {e}"))
        del np_model
        gc.collect()

    mlx_modes = [m for m in args.modes if m.startswith("mlx")]
    if mlx_modes:
        import mlx.core as mx

        import quantref_mlx
        from quantref_mlx.generate import Decoder
        from quantref_mlx.model import Model, on_gpu

        bar.set_postfix_str(f"{name}: loading (MLX)")
        mlx_model = quantref_mlx.load(path, weights=args.weights)
        per_op = Model(mlx_model.args, mlx_model.weights, mlx_model.tokenizer,
                       metadata=mlx_model.metadata, path=mlx_model.path,
                       layout=mlx_model.layout, sync="op")  # the same weights, evaluated per op
        for mode in mlx_modes:
            model = per_op if mode == "mlx-op" else mlx_model
            bar.set_postfix_str(f"{name}: {mode}")
            step = "?"
            try:
                if mode.startswith("mlx-persistent") and \
                        "persistent" not in signature(Decoder).parameters:
                    raise TypeError("skipped: this quantref's Decoder has no persistent step")
                step = which_step(model, args.kv, mode)
                if mode not in SLOW and on_gpu():  # untimed: compile (NVRTC) every kernel the
                    run_mlx(model, args.kv, 300, 2, args.chunk, OPTIONS[mode])  # run may need
                r = adaptive(lambda n: run_mlx(model, args.kv, args.ctx, n, args.chunk,
                                               OPTIONS[mode]),
                             2 if mode in SLOW else 8, args.cap, args.steps)
                done(dict(base, mode=mode, step=step, layout=model.layout, prefill=r[0],
                          decode=r[1], steps=r[2]))
            except Exception as e:  # noqa: BLE001 - e.g. no persistent step in this quantref
                done(dict(base, mode=mode, step=step, error=f"{type(e).__name__}: {e}"))
        del mlx_model, per_op, model
        gc.collect()
        mx.clear_cache()

    if "llama.cpp" in args.modes:
        bar.set_postfix_str(f"{name}: llama-bench")
        if not args.llama_bench:
            done(dict(base, mode="llama.cpp", step="-", error="skipped: no --llama-bench"))
        else:
            for r in llama_bench(args.llama_bench, str(path), [args.ctx], args.steps, args.ctx,
                                 kvs=("f16",)):
                step = f"llama-bench {r.get('build', '?')}" if "error" not in r else "-"
                r = dict(base, **{k: v for k, v in r.items() if k not in ("ctx", "kv")},
                         step=step, steps=args.steps)
                done(r)
    return rows


def table(rows: list[dict]) -> str:
    """The Markdown table: one row per shape and mode, with decode ratios against the same
    shape's ``mlx`` (Decoder's default step) and ``numpy`` rows."""
    def find(shape, mode):
        return next((x for x in rows if x["shape"] == shape and x["mode"] == mode
                     and "error" not in x), None)

    def ratio(r, ref):
        return f"{r['decode'] / ref['decode']:.2f}x" if ref else "-"

    out = ["| shape | params | mode | step | prefill tok/s | decode tok/s | steps "
           "| decode vs mlx | decode vs numpy | decode vs llama.cpp |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['shape']} | {r['params'] / 1e6:.0f}M | {r['mode']} | {r['step']} |"
        if "error" in r:
            out.append(f"{head} {r['error']} | | | | | |")
            continue
        out.append(f"{head} {r['prefill']:.0f} | {r['decode']:.1f} | {r['steps']} | "
                   f"{ratio(r, find(r['shape'], 'mlx'))} | "
                   f"{ratio(r, find(r['shape'], 'numpy'))} | "
                   f"{ratio(r, find(r['shape'], 'llama.cpp'))} |")
    return "\n".join(out)


def fastest(rows: list[dict]) -> str:
    """Per shape, the fastest decode and prefill among the modes measured."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        ok = [r for r in rows if r["shape"] == shape and "error" not in r]
        if ok:
            d = max(ok, key=lambda r: r["decode"])
            p = max(ok, key=lambda r: r["prefill"])
            lines.append(f"{shape}: fastest decode {d['mode']} ({d['decode']:.1f} tok/s), "
                         f"fastest prefill {p['mode']} ({p['prefill']:.0f} tok/s)")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> str:
    """Decode and prefill tokens/s against parameters, a line per mode (log-log), as a PNG;
    returns a note of what was written, or why nothing was (matplotlib is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key in zip(axes, ("decode", "prefill")):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            pts = sorted((r["params"], r[key]) for r in rows
                         if r["mode"] == mode and "error" not in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode)
        ax.set_xscale("log")
        ax.set_yscale("log")
        sizes = dict(sorted({r["params"]: r["shape"] for r in rows}.items()))
        ax.set_xticks(list(sizes), [f"{s}\n{p / 1e6:,.0f}M" for p, s in sizes.items()],
                      fontsize=7)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"{key} tokens/s")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"plot: {path}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"of {tuple(SHAPES)}")
    ap.add_argument("--modes", default=",".join(MODES), help=f"of {MODES} (llama.cpp: only "
                    "with --llama-bench)")
    ap.add_argument("--ctx", type=int, default=128, help="context prefilled before decoding "
                    "(and llama-bench's prompt and depth)")
    ap.add_argument("--kv", default="fp16", help="quantref's KV cache type (llama.cpp: f16)")
    ap.add_argument("--qtype", default="q4_1", choices=("q4_0", "q4_1"),
                    help="the layer weights' type (the embedding is Q8_0)")
    ap.add_argument("--cap", type=float, default=6.0, help="seconds of decoding per timed row, "
                    "about (the probe's steps at least)")
    ap.add_argument("--steps", type=int, default=128, help="at most this many decode steps")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk")
    ap.add_argument("--weights", default="auto", help="MLX weight layout: auto|quantized|float")
    ap.add_argument("--mlx-device", choices=("default", "cpu"), default="default",
                    help="MLX's device: its default (the GPU where there is one) or the CPU")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench binary: the llama.cpp rows")
    ap.add_argument("--dir", help="keep the GGUFs here and reuse those already there "
                    "(default: a temporary folder, removed)")
    ap.add_argument("--json", help="also write the rows (and the machine) to this JSON file")
    ap.add_argument("--plot", help="also plot tokens/s against parameters into this PNG")
    ap.add_argument("--from-json", metavar="JSON", help="measure nothing: print the table of a "
                    "--json file written before (and --plot it), e.g. on a host without "
                    "matplotlib")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        print(f"machine: {saved['machine']}; {saved['load']}")
        print(table(saved["rows"]))
        print(fastest(saved["rows"]))
        if args.plot:
            print(plot(saved["rows"], args.plot, f"{saved['machine']}\nrandom "
                       f"{saved['qtype'].upper()} weights, KV {saved['kv']}, context "
                       f"{saved['ctx']}; {saved['load']}"))
        return
    args.modes = [m for m in args.modes.split(",") if m]
    shapes = [s for s in args.shapes.split(",") if s]
    for m in args.modes:
        if m not in MODES:
            sys.exit(f"unknown mode {m!r}; of {MODES}")
    for s in shapes:
        if s not in SHAPES:
            sys.exit(f"unknown shape {s!r}; of {tuple(SHAPES)}")
    if any(m.startswith("mlx") for m in args.modes):
        import mlx.core as mx  # imported here so that machine() names MLX's device

        if args.mlx_device == "cpu":  # the CPU-only case of --backend auto's rule, on any host
            mx.set_default_device(mx.cpu)

    from tqdm.auto import tqdm

    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="crossover-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    n_rows = len(shapes) * len(args.modes)
    bar = tqdm(total=n_rows, unit="row", dynamic_ncols=True, file=sys.stderr)
    start = time.perf_counter()
    load0 = os.getloadavg()[0]  # other processes' share of the cores, for the reader
    interrupted = False
    try:
        for name in shapes:
            path = folder / f"{name}-{args.qtype}-random.gguf"
            if not path.exists():
                bar.set_postfix_str(f"{name}: writing the GGUF")
                write_gguf(path, SHAPES[name], args.qtype)
            rows += measure_shape(name, path, args, bar)
            if not args.dir:
                path.unlink()
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: the rows measured so far", file=sys.stderr)
    finally:
        bar.close()
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)

    mach = machine()
    load = f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    print(f"machine: {mach}; {load}")
    llama = next((r for r in rows if r["mode"] == "llama.cpp" and "build" in r), None)
    if llama:
        print(f"llama.cpp: llama-bench build {llama['build']} on {llama['gpu']}, f16 KV, "
              f"flash attention, -ngl 99")
    print(f"models: random {args.qtype.upper()} weights, Q8_0 tied embedding; KV {args.kv}; "
          f"context {args.ctx} (prefill: {args.ctx} tokens in one chunk); decode steps adaptive "
          f"(~{args.cap:g} s a row, at most {args.steps}); wall {time.perf_counter() - start:.0f} s"
          + ("; INTERRUPTED" if interrupted else ""))
    print(table(rows))
    print(fastest(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=mach, load=load, ctx=args.ctx,
                                                   kv=args.kv,
                                                   qtype=args.qtype, cap=args.cap, rows=rows,
                                                   interrupted=interrupted), indent=1))
    if args.plot and rows:
        print(plot(rows, args.plot, f"{mach}\nrandom {args.qtype.upper()} weights, "
                   f"KV {args.kv}, context {args.ctx}; {load}"))
    if interrupted:
        sys.exit(130)


if __name__ == "__main__":
    main()
