"""Make ``attention.npz``: llama.cpp's own attention on a quantized KV cache.

``kvppl.cpp`` (beside this file) is a small llama.cpp program: fixed windows of a token file,
every token after a window's first scored, and an eval callback that dumps named tensors of the
first window. Built against llama.cpp as vendored in llama-cpp-python 0.3.36 (commit 0c1e570,
``../shared/device/llamacpp-cuda/llamacpp-src.tar.xz``), CPU only, GGML_NATIVE (x86 AVX2)::

    cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=ON
    cmake --build build --target llama
    g++ -O2 -std=c++17 kvppl.cpp -Iinclude -Iggml/include -Lbuild/bin -lllama -lggml \
        -lggml-base -Wl,-rpath,$PWD/build/bin -o kvppl
    quantref convert --type f32 SmolLM2-135M-Instruct.Q4_1.gguf smollm2-f32.gguf
    # ids.bin: int32 ids of the first 3000 bytes of ppl_1k.txt (add_special=False), first 768
    [LLAMA_ATTN_ROT_DISABLE=1] ./kvppl smollm2-f32.gguf ids.bin q4_0 128 2 128 - DIR \
        Qcur-27,Kcur-27,Vcur-27,kqv_out-27

For each cache type this keeps layer 27 (the layer whose keys have the largest outlier ratio
max|k| / rms(k), 5.9) of the first window, the first ``T = 32`` tokens: Q and K after RoPE,
V, and ``kqv_out`` (flash attention's output, before the output projection; for the rotated
types still in the rotated basis: llama.cpp rotates it back after this node). Causal attention
of rows 0..T-1 sees only keys 0..T-1, so the prefix is a whole problem of its own.

Usage: python make_attention.py DUMPS_ROOT OUT.npz, DUMPS_ROOT holding one folder per type
(q8_0: lc_q8rot_all, q4_0: lc_q4rot_all, q8_0_norot: lc_q8norot_all, q4_0_norot:
lc_q4norot_all).
"""

import glob
import sys

import numpy as np

LAYER, T = 27, 32
FOLDERS = {"q8_0": "lc_q8rot_all", "q4_0": "lc_q4rot_all",
           "q8_0_norot": "lc_q8norot_all", "q4_0_norot": "lc_q4norot_all"}


def dumped(folder: str, name: str, shape: str) -> np.ndarray:
    (path,) = glob.glob(f"{folder}/{name}__f32__{shape}__*.bin")
    ne = [int(x) for x in shape.split("x")]  # ggml order: innermost first
    return np.fromfile(path, np.float32).reshape([n for n in ne[::-1] if n > 1] or [1])


def main(root: str, out: str) -> None:
    arrays = {}
    for kv, folder in FOLDERS.items():
        f = f"{root}/{folder}"
        arrays[f"{kv}/q"] = dumped(f, f"Qcur-{LAYER}", "64x9x128x1")[:T]  # [T, 9, 64]
        arrays[f"{kv}/k"] = dumped(f, f"Kcur-{LAYER}", "64x3x128x1")[:T]  # [T, 3, 64]
        arrays[f"{kv}/v"] = dumped(f, f"Vcur-{LAYER}", "64x3x128x1")[:T]  # [T, 3, 64]
        arrays[f"{kv}/out"] = dumped(f, f"kqv_out-{LAYER}", "576x128x1x1")[:T]  # [T, 576]
    np.savez_compressed(out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
