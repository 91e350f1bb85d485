"""Compile every CUDA kernel of quantref_mlx with NVRTC, on a machine with no GPU.

    pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-cccl-cu12
    python tools/nvrtc_check.py                 # or --nvidia DIR (the folder holding cuda_nvrtc/)

Why: the kernels are compiled by MLX at run time, on the GPU machine, whose time is scarce; a
typo found there costs a lease. This script builds each decode step the way
``quantref_mlx.fused_decode.FusedStep`` and ``quantref_mlx.turbo_kv`` do, on the CPU, with
``mx.fast.cuda_kernel`` replaced by a recorder: every launch's kernel (name, inputs with their
dtypes, outputs, template arguments, header, source) is written out as MLX's CUDA backend writes
it (``mlx/backend/cuda/custom_kernel.cpp``: the header, then ``__global__ void name(const T*
input, [Shape input_shape,] ..., T* output)`` with the template arguments as ``constexpr``
constants, then the body) and compiled for sm_90. Nothing runs: this checks that the sources
compile for every configuration (weights float / 4-bit / 8-bit, every cache type, turbo_kv kind,
score path, value type and k-window, one block per head and split heads), not what they compute;
``tests/test_fused_decode_gpu.py`` on a GPU does that. Exit status 1 when any kernel fails.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import re
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_CUDA_TYPE = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16",
              mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t",
              mx.int32: "int32_t", mx.int64: "int64_t", mx.bool_: "bool"}

# What MLX's default header gives a kernel (its utils.cuh), as far as our kernels use it.
_PRELUDE = """
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda/std/cstdint>
#include <cuda/std/array>
#include <cuda/std/limits>
#include <cooperative_groups.h>
using cuda::std::int32_t; using cuda::std::int64_t; using cuda::std::uint8_t;
using cuda::std::uint16_t; using cuda::std::uint32_t; using cuda::std::uint64_t;
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}
#define inf cuda::std::numeric_limits<float>::infinity()
"""


class Recorder:
    """Stands in for ``mx.fast.cuda_kernel``: records each launch, returns zero outputs."""

    def __init__(self):
        self.sources: dict[str, str] = {}

    def cuda_kernel(self, name, input_names, output_names, source, header="", **_):
        def launch(inputs, output_shapes, output_dtypes, grid, threadgroup, template=(),
                   **__):
            assert len(inputs) == len(input_names), (name, input_names, len(inputs))
            assert all(t > 0 for t in threadgroup) and threadgroup[0] <= 1024, (name, threadgroup)
            params = []
            for n, a in zip(input_names, inputs):
                params.append(f"const {_CUDA_TYPE[a.dtype]}* {n}")
                if a.ndim and n + "_shape" in source:
                    params.append(f"const __grid_constant__ Shape {n}_shape")
            params += [f"{_CUDA_TYPE[d]}* {n}" for n, d in zip(output_names, output_dtypes)]
            consts = "".join(f"  constexpr {'bool' if isinstance(v, bool) else 'int'} {k} = "
                             f"{str(v).lower() if isinstance(v, bool) else v};\n"
                             for k, v in template)
            tag = name + "".join(f"_{v}" for _, v in template)
            self.sources[tag] = (_PRELUDE + header + "namespace mlx::core::cu {\n"
                                 "namespace cg = cooperative_groups;\n"
                                 f"__global__ void {name}(\n    " + ",\n    ".join(params)
                                 + ") {\n" + consts + source + "\n}\n}\n")
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        return launch


def nvrtc(nvidia: Path):
    """``compile(source) -> (ok, log)`` with the NVRTC of a pip ``nvidia-cuda-*-cu12`` folder."""
    lib = ctypes.CDLL(str(next((nvidia / "cuda_nvrtc" / "lib").glob("libnvrtc.so*"))))
    includes = [f"-I{nvidia / 'cuda_runtime' / 'include'}", f"-I{nvidia / 'cuda_cccl' / 'include'}"]
    opts = [*includes, "--gpu-architecture=compute_90", "-std=c++17"]

    def compile_source(src: str, ptx: bool = False, resources: bool = False):
        """(ok, log[, ptx text]); ``resources``: compile for the real sm_90, so that the log
        has ptxas's registers and shared memory per kernel."""
        o = opts if not resources else [*includes, "--gpu-architecture=sm_90", "-std=c++17",
                                         "--ptxas-options=-v"]
        prog = ctypes.c_void_p()
        lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None)
        arr = (ctypes.c_char_p * len(o))(*[x.encode() for x in o])
        status = lib.nvrtcCompileProgram(prog, len(o), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        text = ""
        if ptx and status == 0:
            lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetPTX(prog, buf)
            text = buf.value.decode(errors="replace")
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        return status == 0, log.value.decode(errors="replace"), text

    return compile_source


def find_nvidia() -> Path | None:
    for p in map(Path, sys.path):
        if (p / "nvidia" / "cuda_nvrtc").is_dir():
            return p / "nvidia"
    return None


def record_all(recorder: Recorder, full: bool = False) -> None:
    """Build every decode step and turbo_kv kernel launch on the CPU, recording the kernels."""
    import quantref_mlx.turbo_kv as mtk
    from quantref.testing import random_model
    from quantref_mlx import fused_decode as fd
    from quantref_mlx import turbo_prefill
    from quantref_mlx.model import from_oracle

    # the prefill seam (KVCache.prefill_attention) takes its kernel here, on the CPU: every
    # forward of 3 tokens below records turbo_prefill_attend.cu as the model launches it
    turbo_prefill.USE = True

    configs = [dict(seed=5, vocab_size=512, dim=128, n_layers=1, n_heads=4, n_kv_heads=2,
                    head_dim=32, hidden_dim=256, rope_dim=32, max_seq_len=1024),
               dict(seed=0, vocab_size=1024, n_layers=1),  # SmolLM2-135M's other shapes
               dict(seed=1, vocab_size=512, dim=256, n_layers=1, n_heads=2, n_kv_heads=1,
                    head_dim=256, hidden_dim=512, rope_dim=256, max_seq_len=1024)]
    caches = [("fp32", {}), ("fp16", {})]
    # every score path with every value type, kinds and k-window in rotation (each kernel
    # branch is a template constant of its own; --full: the whole product, ~30x longer)
    combos = list(itertools.product(mtk.KINDS, mtk.PATHS, ("fp16", "fp32", "q4", "q2"), (0, 16)))
    if not full:
        combos = [(mtk.KINDS[i % 3], path, v, 16 * (i % 2))
                  for i, (path, v) in enumerate(itertools.product(mtk.PATHS,
                                                                  ("fp16", "fp32", "q4", "q2")))]
    caches += [(kind, dict(score_path=path, v=v, k_window=w)) for kind, path, v, w in combos]
    for cfg in configs:
        np_model = random_model(**cfg)
        for weights, bits in (("float", 4), ("quantized", 4), ("quantized", 8)):
            model = from_oracle(np_model, weights=weights, bits=bits, embed_bits=8)
            for kv, options in caches:
                if model.args.head_dim == 256 and kv in ("fp32", "fp16"):
                    continue
                # every cache type with one weight layout; every layout with three caches
                if weights != "float" and options.get("v", "fp16") != "fp16":
                    continue
                cache = model.make_cache(kv, **options)
                mx.eval(model.forward([1, 2, 3], cache, last_only=True), cache.state())
                why = fd._cache_supported(cache, model.args.head_dim)
                assert why is None, (kv, options, why)
                turbo = fd.TurboSpec.of(cache)
                # one block per head; split heads (once per cache type)
                for capacity in (256, 1024) if weights == "float" else (256,):
                    cache.reserve(capacity)
                    step = fd.FusedStep(model, turbo)
                    k, v = cache.take_buffers()
                    window = [cache.take_window()] if cache.k_window else []
                    step(mx.array([1], mx.int32), fd.position(3), k, v, *window)
                    if turbo is not None and weights == "float" and capacity == 256:
                        a = model.args
                        q = mx.zeros((a.n_heads * a.head_dim,), mx.float32)
                        kv = mx.zeros((2 * a.n_kv_heads * a.head_dim,), mx.float32)
                        step.attend_scores(q, kv, k[0][0], v[0][0], fd.position(3),
                                           *[w[0] for w in window])
                    cache.give_buffers(k, v, 0)
                if weights == "quantized" and not options.get("k_window"):  # persistent step
                    from quantref_mlx import persistent_decode as pd

                    k, v = cache.take_buffers()
                    kc, vc = (mx.stack([b[0] for b in bufs]) for bufs in (k, v))
                    # (the last: greedy decoding's default, STEPS tokens a launch)
                    for sync, form, steps in (("grid", "fused", 1), ("flags", "fused", 1),
                                              ("grid", "rows", 1), ("release", "rows", 1),
                                              ("grid", "rows", pd.STEPS),
                                              ("grid", "fused", pd.STEPS)):
                        step = pd.PersistentStep(model, fd.TurboSpec.of(cache), blocks=132,
                                                 sync=sync, times=sync == "flags", form=form,
                                                 steps=steps)
                        step._launchable = True  # no probe launch while recording
                        step(mx.array([1, 0, 0, 0], mx.int32), fd.position(3), kc, vc)
                    cache.give_buffers(k, v, 0)
        # the turbo_kv quantizer / dequantizer kernels, every kind
        for kind in mtk.KINDS:
            x = mx.zeros((2, np_model.args.head_dim), mx.float32)
            blocks = mtk._quantize_kernel(x, kind, "cuda")
            mtk._dequantize_kernel(blocks, kind, np_model.args.head_dim, "cuda")
    record_prefill(full)
    turbo_prefill.USE = None


def record_prefill(full: bool = False) -> None:
    """``turbo_prefill_attend.cu`` launched directly, beyond what the models above reach: head
    sizes 32, 64, 128 and 256, a sliding window, the scores output (tests), every score path
    with every value type (kinds, k-window and sliding window in rotation; --full: all)."""
    import quantref_mlx.turbo_kv as mtk
    from quantref_mlx import turbo_prefill
    from quantref_mlx.fused_decode import TurboSpec

    combos = list(itertools.product(mtk.KINDS, mtk.PATHS, TurboSpec.V_TYPES, (0, 16), (0, 8)))
    if not full:
        combos = [(mtk.KINDS[i % 3], path, v, 16 * (i % 2), 8 * (i // 2 % 2))
                  for i, (path, v) in enumerate(itertools.product(mtk.PATHS,
                                                                  TurboSpec.V_TYPES))]
    vdtype = {"fp32": mx.float32, "fp16": mx.float16}
    P, T, cap = 3, 5, 256
    for hd, nh, nkv in ((32, 4, 2), (64, 9, 3), (128, 4, 2), (256, 2, 1)):
        nc = -(-hd // mtk.BLOCK)
        for i, (kind, path, v, window, swin) in enumerate(combos):
            spec = TurboSpec(kind, path, v, window)
            q = mx.zeros((nh, T, hd), mx.float32)
            kbuf = mx.zeros((nkv, cap, nc, mtk.block_bytes(kind)), mx.uint8)
            vbuf = mx.zeros((nkv, cap, hd), vdtype[v]) if v in vdtype \
                else mx.zeros((nkv, cap, mtk.v_bytes(v, hd)), mx.uint8)
            kw = mx.zeros((nkv, min(window, P) + T, hd), mx.float32) if window else None
            turbo_prefill.attend(q, kbuf, vbuf, P, spec, hd ** -0.5, kw, swin,
                                 scores=i % len(TurboSpec.V_TYPES) == 0)  # scores: each path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nvidia", type=Path, help="folder with cuda_nvrtc/, cuda_runtime/, "
                    "cuda_cccl/ (pip's nvidia-*-cu12 packages; default: found on sys.path)")
    ap.add_argument("--full", action="store_true", help="every cache configuration")
    ap.add_argument("--only", default="", help="compile only kernels whose name (with its template values) matches this regex")
    ap.add_argument("--dump", type=Path, help="write each generated source (and its PTX) into "
                    "this folder: a refactoring that keeps a kernel's PTX keeps its behaviour")
    ap.add_argument("--resources", action="store_true",
                    help="also compile for sm_90 and print ptxas's registers per thread")
    ap.add_argument("--prefill-shape", default="", metavar="NWxROWS",
                    help="turbo_prefill's warps and rows a block, forced (default: its rule)")
    args = ap.parse_args()
    if args.prefill_shape:
        from quantref_mlx import turbo_prefill

        turbo_prefill.NW, turbo_prefill.ROWS = map(int, args.prefill_shape.split("x"))
    nvidia = args.nvidia or find_nvidia()
    if nvidia is None:
        print("NVRTC not found: pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 "
              "nvidia-cuda-cccl-cu12, or pass --nvidia")
        return 2
    recorder = Recorder()
    real = mx.fast.cuda_kernel
    mx.fast.cuda_kernel = recorder.cuda_kernel
    try:
        with mx.stream(mx.cpu):
            record_all(recorder, args.full)
    finally:
        mx.fast.cuda_kernel = real
    compile_source = nvrtc(nvidia)
    failed = 0
    chosen = {k: s for k, s in recorder.sources.items() if re.search(args.only, k)}
    print(f"{len(recorder.sources)} kernels recorded; compiling {len(chosen)}", flush=True)
    for tag, src in sorted(chosen.items()):
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"{tag}.cu").write_text(src)
        ok, log, ptx = compile_source(src, ptx=bool(args.dump))
        if args.dump and ok:
            (args.dump / f"{tag}.ptx").write_text(ptx)
        if ok and args.resources:
            _, info, _ = compile_source(src, resources=True)
            regs = re.findall(r"Used (\d+) registers.*", info)
            print(f"{tag}: {regs[0] if regs else info.strip()[-300:]} registers", flush=True)
        if not ok:
            failed += 1
            print(f"FAILED {tag}\n{log}", flush=True)
    print(f"{len(chosen) - failed} of {len(chosen)} kernels compile "
          f"(sm_90, NVRTC)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
