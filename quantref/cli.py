"""The ``quantref`` command: fetch, info, ppl, convert.

Every command runs on the default model (SmolLM2-135M-Instruct, fetched on first use) unless
``--model`` names a GGUF file or a known model; ``quantref ppl`` evaluates the project's own
default text unless ``--text`` names a file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

__all__ = ["main"]

ALL_KV = ("fp32", "fp16", "q8_0", "q4_0", "q8_0_norot", "q4_0_norot", "mlx_q8", "mlx_q4",
          "turbo_kv_5b", "turbo_kv_4b", "turbo_kv_3b")


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------

def _model_path(args: argparse.Namespace) -> Path:
    from .fetch import MODELS, model_path

    if args.model is None or args.model in MODELS:
        return model_path(args.model or "smollm2-135m", args.cache_dir,
                          progress=not args.no_progress and sys.stderr.isatty())
    path = Path(args.model).expanduser()
    if not path.exists():
        raise SystemExit(f"quantref: error: model file {path} does not exist "
                         f"(known model names: {', '.join(MODELS)})")
    return path


def auto_backend(path: Path | None = None):
    """``--backend auto``'s :class:`quantref.backend.Choice` for the GGUF at ``path`` (its
    parameter count; None: a model of unknown size) on this machine's device: the rule of
    :func:`quantref.backend.choose_backend` (``docs/benchmarks.md``, "Where the GPU wins")."""
    from .backend import choose_backend, detect_device, n_params_of

    return choose_backend(n_params_of(path) if path is not None else None, detect_device())


def resolve_backend(name: str, path: Path | None = None) -> str:
    """``numpy``, ``mlx``, or for ``auto``: :func:`auto_backend`'s choice for the model at
    ``path``."""
    if name in ("numpy", "mlx"):
        if name == "mlx":
            try:
                import mlx.core  # noqa: F401 - only whether it imports
            except ImportError:
                raise SystemExit("quantref: error: --backend mlx needs MLX: pip install "
                                 "'quantref[mlx]'") from None
        return name
    return auto_backend(path).backend


def _engine(args: argparse.Namespace):
    """(the backend's name, its package, a loaded model) for a command's --backend/--model
    options; ``--weights`` and ``--sync-every-op`` are MLX's and an error with NumPy."""
    given = [o for o, on in (("--weights", args.weights != "auto"),
                             ("--sync-every-op", args.sync_every_op)) if on]
    verb = "applies" if len(given) == 1 else "apply"
    if given and args.backend == "numpy":  # before fetching anything
        raise SystemExit(f"quantref: error: {' and '.join(given)} {verb} to the MLX backend, "
                         "not numpy")
    path = _model_path(args)
    backend = resolve_backend(args.backend, path)
    if given and backend == "numpy":
        raise SystemExit(f"quantref: error: {' and '.join(given)} {verb} to the MLX backend, "
                         f"not numpy (--backend auto chose numpy: {auto_backend(path).why})")
    if backend == "mlx":
        import quantref_mlx

        return backend, quantref_mlx, quantref_mlx.load(
            path, weights=args.weights, sync="op" if args.sync_every_op else "step")
    import quantref

    return backend, quantref, quantref.load(path)


def _load_text(path: str | None) -> tuple[str, str]:
    """(text, a short description of where it came from)."""
    if path is None:
        from .perplexity import default_text

        text = default_text()
        return text, f"quantref default text ({len(text.split())} words)"
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SystemExit(f"quantref: error: text file {p} does not exist") from None
    except UnicodeDecodeError as e:
        raise SystemExit(f"quantref: error: {p} is not UTF-8 text (byte {e.start})") from None
    return text, f"{p.name} ({len(text.encode('utf-8'))} bytes)"


def _kv_list(spec: str) -> list[str]:
    from .cache import KV_TYPES

    kinds = list(ALL_KV) if spec == "all" else [k.strip() for k in spec.split(",") if k.strip()]
    for k in kinds:
        if k not in KV_TYPES:
            raise SystemExit(f"quantref: error: unknown --kv {k!r}; one of: all, "
                             + ", ".join(KV_TYPES))
    if not kinds:
        raise SystemExit("quantref: error: --kv is empty")
    return kinds


def _turbo_opts(args: argparse.Namespace, kinds: Sequence[str]) -> dict[str, Any]:
    """The turbo_kv options given (``--v``, ``--k-window``, ``--score-path``) as keyword
    arguments; an error when one is given but no ``--kv`` type is a turbo_kv one."""
    given = {name: value for name, value in (("v", args.v), ("k_window", args.k_window),
                                             ("score_path", args.score_path))
             if value is not None}
    if given and not any(k.startswith("turbo_kv_") for k in kinds):
        flags = " and ".join("--" + n.replace("_", "-") for n in given)
        verb = "applies" if len(given) == 1 else "apply"
        raise SystemExit(f"quantref: error: {flags} {verb} to turbo_kv K types only, and --kv "
                         f"{','.join(kinds)} has none")
    return given


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

def cmd_fetch(args: argparse.Namespace) -> int:
    from .fetch import fetch

    path = fetch(args.model or "smollm2-135m", args.cache_dir, force=args.force,
                 progress=not args.no_progress and sys.stderr.isatty())
    print(path)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from . import gguf
    from .cache import KV_TYPES, make_cache
    from .model import ModelArgs

    path = _model_path(args)
    with gguf.read(path) as gf:
        margs = ModelArgs.from_metadata(gf.metadata, list(gf.tensors), path)
        types = Counter(t.qtype.name for t in gf.tensors.values())
        n_params = sum(t.n_elements for t in gf.tensors.values())
        md = gf.metadata
        info: dict[str, Any] = {
            "path": str(path),
            "gguf_version": gf.version,
            "architecture": md.get("general.architecture"),
            "name": md.get("general.name"),
            "options": margs.options,  # what this architecture does beyond llama's block
            "hyperparameters": {k: (v if not hasattr(v, "tolist") else v.tolist())
                                for k, v in vars(margs).items()},
            "tensor_types": dict(types.most_common()),
            "n_tensors": len(gf.tensors),
            "n_params": n_params,
            "tokenizer": {"model": md.get("tokenizer.ggml.model"),
                          "pre": md.get("tokenizer.ggml.pre"),
                          "add_bos": md.get("tokenizer.ggml.add_bos_token")},
        }
    kv_bytes = {}
    for kind in KV_TYPES:
        try:
            cache = make_cache(kind, n_layers=margs.n_layers, n_kv_heads=margs.n_kv_heads,
                               head_dim=margs.head_dim)
        except ValueError:  # e.g. a head_dim the block size does not divide
            continue
        kv_bytes[kind] = cache.bytes_per_token
    info["kv_bytes_per_token"] = kv_bytes
    if args.backend == "auto":
        choice = auto_backend(path)
        info["backend"] = choice.backend
        info["backend_rule"] = {"step": choice.step, "why": choice.why}
    else:
        info["backend"] = resolve_backend(args.backend)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    hp = info["hyperparameters"]
    print(f"model         {path}")
    print(f"architecture  {info['architecture']}  ({info['name']}, GGUF v{info['gguf_version']})")
    opts = dict(info["options"])
    swa = opts.pop("swa_layers", None)
    shown = [k if v is True else f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
             for k, v in opts.items()]
    if swa is not None:
        shown.append(f"(sliding window on {len(swa)} of {hp['n_layers']} layers)")
    print(f"options       {'  '.join(shown) or 'none (plain llama)'}")
    print(f"layers        {hp['n_layers']}   dim {hp['dim']}   ffn {hp['hidden_dim']}   "
          f"vocab {hp['vocab_size']}")
    print(f"heads         {hp['n_heads']} query / {hp['n_kv_heads']} KV, head_dim "
          f"{hp['head_dim']}   rope base {hp['rope_base']:g}   eps {hp['norm_eps']:g}")
    print(f"context       {hp['max_seq_len']}   tied embeddings: {hp['tied_embeddings']}")
    print(f"tokenizer     {info['tokenizer']['model']} / {info['tokenizer']['pre']}   "
          f"add_bos={info['tokenizer']['add_bos']}")
    print(f"parameters    {n_params:,} in {info['n_tensors']} tensors: "
          + ", ".join(f"{k} {v}" for k, v in info["tensor_types"].items()))
    print("KV bytes/token " + "  ".join(f"{k} {v:,.0f}" for k, v in kv_bytes.items()))
    rule = info.get("backend_rule")
    print(f"backend       {info['backend']} (--backend {args.backend}"
          + (f": {rule['why']}" if rule else "") + ")")
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from .perplexity import make_windows

    kinds = _kv_list(args.kv)
    if args.perturb < 1:
        raise SystemExit("quantref: error: --perturb needs N >= 1")
    opts = _turbo_opts(args, kinds)
    text, text_desc = _load_text(args.text)
    backend, engine, model = _engine(args)
    perplexity = engine.perplexity
    ids = model.tokenizer.encode(text, add_special=False)
    per_pass = sum(len(w) for w, _ in make_windows(model, None, ids, args.ctx, args.batch,
                                                   args.scoring))

    multi = len(kinds) > 1
    if multi and kinds[0] != "fp32":
        kinds = ["fp32"] + [k for k in kinds if k != "fp32"]  # the reference runs first
    meta = {"model": model.path.name, "text": text_desc, "tokens": per_pass, "batch": args.batch,
            "ctx": args.ctx, "scoring": args.scoring, "perturb": args.perturb,
            "backend": backend}
    out = RowPrinter(args, meta, [_label(k, opts, model) for k in kinds], multi)
    n_passes = len(kinds) * args.perturb
    # One bar over every pass (a pass: one run over the text), by tokens, with the ETA.
    bar = tqdm(total=n_passes * per_pass, unit="tok", dynamic_ncols=True, leave=False,
               disable=args.no_progress or not sys.stderr.isatty())
    rows: list[dict[str, Any]] = []
    reference = None
    try:
        for i, kind in enumerate(kinds):
            kind_opts = opts if kind.startswith("turbo_kv_") else {}
            runs = []
            for k in range(args.perturb):
                bar.set_description(f"pass {i * args.perturb + k + 1}/{n_passes}: {kind}"
                                    + (f" run {k + 1}/{args.perturb}" if args.perturb > 1
                                       else ""))
                runs.append(perplexity(
                    model, ids=ids, ctx=args.ctx, batch=args.batch, kv=kind, scoring=args.scoring,
                    keep_logprobs=multi and kind == "fp32" and k == 0,
                    reference=reference if k == 0 else None, perturb=k, progress=bar,
                    **kind_opts))
            if multi and kind == "fp32":
                reference = runs[0]
            row = _row(runs, reference)
            if reference is not None:
                row["ppl_change_pct"] = 100.0 * (row["ppl"] / reference.ppl - 1.0)
            rows.append(row)
            out.row(row, bar)
    except KeyboardInterrupt:
        bar.close()
        out.end(rows, interrupted=True)
        print(f"quantref: interrupted: {len(rows)} of {len(kinds)} rows finished",
              file=sys.stderr)
        return 130
    bar.close()
    out.end(rows, interrupted=False)
    return 0


def _label(kind: str, opts: dict[str, Any], model) -> str:
    """The row label of ``kind`` under the turbo options (``turbo_kv_4b/v=q4``, ...)."""
    from .cache import kv_label, make_cache

    a = model.args
    cache = make_cache(kind, n_layers=1, n_kv_heads=1, head_dim=a.head_dim,
                       **(opts if kind.startswith("turbo_kv_") else {}))
    return kv_label(cache)


class RowPrinter:
    """Prints ``quantref ppl``'s rows as each finishes (table: a header first; CSV: a header
    first; JSON: one object at the end, see :func:`json_result`), and what was finished when
    the run is interrupted."""

    def __init__(self, args: argparse.Namespace, meta: dict[str, Any], labels: list[str],
                 multi: bool):
        self.args, self.meta, self.multi = args, meta, multi
        self.widths = list(TABLE_WIDTHS)
        self.widths[0] = max(self.widths[0], *(len(label) for label in labels))
        self.started = False
        self.csv_fields: list[str] | None = None

    def _emit(self, text: str, bar=None) -> None:
        if bar is not None and not bar.disable:
            bar.write(text, file=sys.stdout)  # above the bar, which is redrawn below
        else:
            print(text)
        sys.stdout.flush()

    def row(self, row: dict[str, Any], bar=None) -> None:
        a = self.args
        if a.json or (not self.multi and not a.csv):
            return  # one JSON object, or the one-run summary: printed at the end
        if a.csv:
            if self.csv_fields is None:
                self.csv_fields = csv_fields(row)
                self._emit(_csv_line(self.csv_fields), bar)
            self._emit(_csv_line([_csv_cell(row.get(f)) for f in self.csv_fields]), bar)
            return
        if not self.started:
            m = self.meta
            self._emit(f"model {m['model']}   text {m['text']}   tokens {m['tokens']}   "
                       f"runs per type {m['perturb']}   backend {m['backend']}", bar)
            self._emit(_table_line(TABLE_HEAD, self.widths), bar)
            self._emit(_table_line(["-" * w for w in self.widths], self.widths), bar)
            self.started = True
        self._emit(_table_line(table_cells(row), self.widths), bar)

    def end(self, rows: list[dict[str, Any]], interrupted: bool) -> None:
        a = self.args
        if a.json:
            print(json.dumps(json_result(self.meta, rows, interrupted), indent=2))
        elif not self.multi and not a.csv and rows:
            _print_summary(self.meta, rows[0])
        sys.stdout.flush()


def json_result(meta: dict[str, Any], rows: list[dict[str, Any]],
                interrupted: bool = False) -> dict[str, Any]:
    """``quantref ppl --json``'s one shape, for one KV type or several: the run's settings
    (``model``, ``text``, ``tokens`` per run, ``batch``, ``ctx``, ``perturb``, ``backend``:
    ``numpy`` or ``mlx``), ``interrupted`` and ``rows``, one object per KV type in the order
    run (fp32 first when there are several: the reference of their ``mean_kl``, ``top1_agree``
    and ``ppl_change_pct``)."""
    return {**meta, "interrupted": interrupted, "rows": rows}


def _print_summary(meta: dict[str, Any], r: dict[str, Any]) -> None:
    print(f"model   {meta['model']}")
    print(f"text    {meta['text']}")
    print(f"tokens  {r['tokens']}   scored {r['n_scored']}")
    print(f"kv      {r['kv']}   {r['kv_bytes_per_token']:,.0f} bytes/token")
    spread = (f"   (over {meta['perturb']} runs: min {r['ppl_min']:.4f}, max {r['ppl_max']:.4f})"
              if meta["perturb"] > 1 else "")
    print(f"PPL     {r['ppl']:.4f}   mean NLL {r['mean_nll']:.5f}{spread}")
    print(f"speed   {r['tok_per_s']:.1f} tokens/s ({meta['backend']})")


def csv_fields(first: dict[str, Any]) -> list[str]:
    """CSV columns: the first row's keys, plus those only later rows have (the comparison
    with the fp32 reference)."""
    fields = list(first)
    for extra in ("mean_kl", "top1_agree", "ppl_change_pct"):
        if extra not in fields:
            fields.append(extra)
    return fields


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return " ".join(repr(v) for v in value)  # the perturbed runs' PPLs, in one cell
    return "" if value is None else value


def _csv_line(cells: Sequence[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(cells)
    return buf.getvalue()


def _row(runs: list, reference) -> dict[str, Any]:
    """One table row from a run and its perturbed repeats (the first run is unperturbed)."""
    first = runs[0]
    row = first.summary()
    ppls = [r.ppl for r in runs]
    row["ppl_runs"] = ppls
    row["ppl_mean"] = float(sum(ppls) / len(ppls))
    row["ppl_min"] = float(min(ppls))
    row["ppl_max"] = float(max(ppls))
    row["tok_per_s"] = float(sum(r.tokens for r in runs) / sum(r.seconds for r in runs))
    row["compression_vs_fp16"] = 16.0 * 2 / (first.kv_bits[0] + first.kv_bits[1])
    return row


TABLE_HEAD = ["KV", "K bits", "V bits", "bytes/tok", "vs fp16", "PPL", "mean", "min..max",
              "dPPL %", "mean KL", "top-1", "tok/s"]
# Column widths fixed ahead (rows print as they finish); the KV column widens to the labels.
TABLE_WIDTHS = [11, 6, 6, 9, 7, 9, 9, 17, 7, 8, 6, 6]


def table_cells(r: dict[str, Any]) -> list[str]:
    """One row of the ``--kv`` comparison table. PPL: the exact (unperturbed) run; mean,
    min..max: over the ``--perturb`` runs; dPPL, KL and top-1: the exact run against fp32's."""
    kl = r.get("mean_kl")
    agree = r.get("top1_agree")
    change = r.get("ppl_change_pct")
    return [
        r["kv"], f"{r['k_bits']:.2f}", f"{r['v_bits']:.2f}", f"{r['kv_bytes_per_token']:,.0f}",
        f"{r['compression_vs_fp16']:.2f}x", f"{r['ppl']:.4f}", f"{r['ppl_mean']:.4f}",
        f"{r['ppl_min']:.3f}..{r['ppl_max']:.3f}",
        "-" if change is None else f"{change:+.2f}",
        "-" if kl is None else f"{kl:.5f}",
        "-" if agree is None else f"{100 * agree:.1f}%",
        f"{r['tok_per_s']:.0f}",
    ]


def _table_line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths)))


def format_table(rows: list[dict[str, Any]]) -> str:
    """The ``--kv`` comparison table as aligned text (columns as wide as their cells)."""
    lines = [table_cells(r) for r in rows]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(TABLE_HEAD)]
    return "\n".join(_table_line(cells, widths)
                     for cells in [TABLE_HEAD, ["-" * w for w in widths], *lines])


def cmd_generate(args: argparse.Namespace) -> int:
    opts = _turbo_opts(args, [args.kv])
    backend, engine, model = _engine(args)
    if backend == "mlx":  # the MLX step the rule names (quantref.backend): persistent, where
        # it runs, up to CUDA_PERSISTENT_MAX_PARAMS parameters on a CUDA GPU
        step = auto_backend(_model_path(args)).step
        opts["persistent"] = None if step == "persistent" else False
    last = None
    for last in engine.stream_generate(
            model, args.prompt, args.max_tokens, temp=args.temp, top_p=args.top_p,
            top_k=args.top_k, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
            repeat_last_n=args.repeat_last_n, frequency_penalty=args.frequency_penalty,
            presence_penalty=args.presence_penalty, seed=args.seed, chat=args.chat, kv=args.kv,
            **opts):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    if last is not None:
        print()
        print(f"[{backend}, kv {args.kv}] prompt: {last.prompt_tokens} tokens, "
              f"{last.prompt_tps:.1f} tokens/s; generation: {last.generation_tokens} tokens, "
              f"{last.generation_tps:.1f} tokens/s ({last.finish_reason})", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    out = convert(args.input, args.output, args.type,
                  progress=not args.no_progress and sys.stderr.isatty())
    print(out)
    return 0


# ---------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", help="where models are kept (default: $QUANTREF_CACHE, "
                        "else $XDG_CACHE_HOME/quantref, else ~/.cache/quantref)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    with_model = argparse.ArgumentParser(add_help=False, parents=[common])
    with_model.add_argument("--model", "-m", help="a GGUF file, or a known model name "
                            "(default: smollm2-135m, fetched on first use)")
    backend = argparse.ArgumentParser(add_help=False)
    backend.add_argument("--backend", choices=("numpy", "mlx", "auto"), default="auto",
                         help="numpy (the oracle), mlx, or auto: by the model's size and "
                         "the device (docs/benchmarks.md, 'Where the GPU wins'; default auto)")
    engine = argparse.ArgumentParser(add_help=False, parents=[with_model, backend])
    engine.add_argument("--weights", choices=("auto", "quantized", "float"), default="auto",
                        help="MLX weight layout (default auto: quantized on a GPU, float "
                        "on the CPU); an error with the numpy backend")
    engine.add_argument("--sync-every-op", action="store_true",
                        help="MLX: evaluate after every operation (the per-op-sync pattern, "
                        "to measure its cost); an error with the numpy backend")
    # None = not given: each is an error unless a --kv type is a turbo_kv one
    kv_opts = argparse.ArgumentParser(add_help=False)
    kv_opts.add_argument("--v", choices=("fp16", "fp32", "q4", "q2"), help="turbo_kv only: "
                         "the V type (default fp16)")
    kv_opts.add_argument("--k-window", type=int, help="turbo_kv only: keep the newest N "
                         "keys in float32 too (default 0)")
    kv_opts.add_argument("--score-path", choices=("int8_codebook", "fp32_codebook", "dequant"),
                         help="turbo_kv only: the attention-score path (default int8_codebook)")

    parser = argparse.ArgumentParser(
        prog="quantref", description="GGUF Llama models with a compressed KV cache: "
        "a NumPy oracle and an MLX engine.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"quantref {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fetch", parents=[with_model], help="download the default model into the "
                       "cache (or --model NAME)")
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("info", parents=[with_model, backend], help="architecture, hyperparameters, "
                       "tensor types, parameters, KV bytes per token")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("ppl", parents=[engine, kv_opts], help="perplexity of a text; rows "
                       "print as they finish, Ctrl-C prints those finished and exits 130")
    p.add_argument("--text", "-f", help="UTF-8 text file (default: quantref's own English text)")
    p.add_argument("--ctx", type=int, help="window length in tokens (default: the whole text; "
                   "with --scoring llama.cpp: 512)")
    p.add_argument("--scoring", choices=("all", "llama.cpp"), default="all",
                   help="all (default): score every token after each window's first, a short "
                   "trailing remainder in a window of the text's last --ctx tokens; llama.cpp: "
                   "as llama-perplexity, full chunks of --ctx only, the remainder dropped, BOS "
                   "over each chunk's first token when the model adds BOS, only the predictions "
                   "from positions ctx/2 .. ctx-2 scored")
    p.add_argument("--batch", type=int, default=256, help="tokens per forward pass (default 256)")
    p.add_argument("--kv", default="fp32", help="KV cache type, a comma list, or 'all' "
                   f"({', '.join(ALL_KV)}); several print a comparison table (default fp32)")
    p.add_argument("--perturb", type=int, default=1, metavar="N",
                   help="run N times, the k-th with the token embeddings scaled by 1 +- k ulps, "
                   "and report mean, min and max PPL (default 1: one exact run)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--csv", action="store_true", help="print CSV (one row per KV type)")
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("generate", parents=[engine, kv_opts], help="generate text, "
                       "streamed; the prompt goes through the model's chat template, as in "
                       "mlx-lm (--no-chat: raw text)")
    p.add_argument("--prompt", "-p", required=True, help="the prompt")
    p.add_argument("--max-tokens", "-n", type=int, default=128, help="at most N new tokens "
                   "(default 128)")
    p.add_argument("--temp", type=float, default=0.0, help="temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling: exactly K candidates, "
                   "equal logits lower token id first (default 0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p sampling: keep tokens at least "
                   "P times as likely as the top one (default 0: off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="llama.cpp's repetition "
                   "penalty on the last --repeat-last-n tokens, prompt included (default 1: off)")
    p.add_argument("--repeat-last-n", type=int, default=64, help="the penalty's window in tokens "
                   "(default 64, as llama.cpp's; 0: off, -1: all tokens)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="subtracted per "
                   "occurrence in the window (default 0: off)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted once if the "
                   "token is in the window (default 0: off)")
    p.add_argument("--seed", type=int, help="random seed for sampling (llama.cpp's stream: "
                   "the same seed gives the same draws)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="require the model's chat template (an error if it has none)")
    chat.add_argument("--no-chat", "--raw", "--ignore-chat-template", dest="chat",
                      action="store_false", help="send the prompt as raw text, without the "
                      "chat template. Default, as mlx-lm's: the prompt is one user message "
                      "through the model's chat template when it has one, else raw text")
    p.add_argument("--kv", default="fp32", help="KV cache type (default fp32)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", parents=[common], help="re-export a GGUF with other tensor "
                       "types (any architecture; metadata kept)")
    p.add_argument("input", help="input .gguf")
    p.add_argument("output", help="output .gguf (written to a temporary file, then renamed)")
    p.add_argument("--type", required=True, choices=("q8_0", "f16", "f32"))
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .fetch import FetchError
    from .gguf import GGUFError
    from .model import UnsupportedModelError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FetchError, GGUFError, UnsupportedModelError, ValueError, OSError) as e:
        print(f"quantref: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("quantref: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
