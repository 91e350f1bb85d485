"""Make llama_cpp_chain.json / .npz: the tokens llama.cpp's own sampler chain draws for random
logits, sampler settings, histories and seeds (tests/test_sampling.py replays them).

llama.cpp is the copy vendored in llama-cpp-python 0.3.36 (../shared/device/llamacpp-cuda/
llamacpp-src.tar.xz, commit 0c1e570). llama_cpp_chain.cpp is compiled against its
src/llama-sampler.cpp (and the vocab / grammar / unicode files it references), ggml-base and
link stubs for the context and model-loader functions that sampling never calls
(llama_stubs.cpp). Run from the repository root after tests/data/gguf_rules/make_golden.py
(which builds ggml-base in the same work folder); ~3 minutes on 2 cores:

    python tests/data/sampling/make_golden.py [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SOURCES = ["llama-sampler", "llama-impl", "llama-grammar", "llama-vocab", "unicode", "unicode-data"]


def build(work: Path) -> Path:
    src, lib = work / "llama.cpp", work / "build/ggml/src/libggml-base.a"
    if not lib.exists():
        sys.exit(f"{lib} is missing: run tests/data/gguf_rules/make_golden.py first")
    inc = [f"-I{src / d}" for d in ("include", "ggml/include", "src")]
    objs = []
    for name in SOURCES + ["llama_stubs"]:
        c = HERE / "llama_stubs.cpp" if name == "llama_stubs" else src / "src" / f"{name}.cpp"
        o = work / f"{name}.o"
        if not o.exists():
            subprocess.run(["g++", "-O1", "-std=c++17", *inc, "-c", c, "-o", o], check=True)
        objs.append(o)
    exe = work / "llama_cpp_chain"
    subprocess.run(["g++", "-O1", "-std=c++17", *inc, HERE / "llama_cpp_chain.cpp", *objs, lib,
                    "-fopenmp", "-lpthread", "-o", exe], check=True)
    return exe


def cases() -> list[dict]:
    """Random settings over llama.cpp's code paths: top-k at most 128 (std::partial_sort) and
    over (bucket sort), top-p over more than 1024 unsorted candidates (its adaptive sort),
    min-p sorted and unsorted, penalties with short, long (-1) and no windows, greedy."""
    rng = np.random.default_rng(20261129)
    out = [dict(seed=5, steps=6, temp=1.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                repeat_last_n=64, frequency_penalty=0.0, presence_penalty=0.0, history=[],
                logits=np.array([3, 3, 3, 0], np.float32))]  # issue 10's top-k case
    for i in range(48):
        vocab = int(rng.choice([8, 40, 300, 2000]))
        while True:
            logits = (rng.standard_normal(vocab) * rng.choice([1.0, 3.0, 8.0])).astype(np.float32)
            if np.unique(logits).size == vocab:  # no ties: llama.cpp's order among equal
                break                            # logits is its sort's, unspecified
        out.append(dict(
            seed=int(rng.integers(0, 2**32)), steps=12,
            temp=float(rng.choice([0.0, 0.3, 0.8, 1.0, 1.5])),
            top_k=int(rng.choice([0, 1, 5, 40, 200])),
            top_p=float(rng.choice([1.0, 0.95, 0.5])),
            min_p=float(rng.choice([0.0, 0.05, 0.2])),
            repeat_penalty=float(rng.choice([1.0, 1.1, 1.5])),
            repeat_last_n=int(rng.choice([64, 3, -1, 0])),
            frequency_penalty=float(rng.choice([0.0, 0.3])),
            presence_penalty=float(rng.choice([0.0, 0.5])),
            history=rng.integers(0, vocab, int(rng.integers(0, 20))).tolist(),
            logits=logits))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llamacpp-gguf")
    exe = build(ap.parse_args().work)
    lines = []
    for c in cases():
        nums = [c["seed"], c["steps"], c["temp"], c["top_k"], c["top_p"], c["min_p"],
                c["repeat_penalty"], c["repeat_last_n"], c["frequency_penalty"],
                c["presence_penalty"], len(c["history"]), *c["history"], c["logits"].size]
        # %.9g round-trips a float32 exactly through strtof
        lines.append(" ".join(map(str, nums)) + " " + " ".join(f"{x:.9g}" for x in c["logits"]))
    r = subprocess.run([exe], input="\n".join(lines) + "\n", capture_output=True, text=True,
                       check=True)
    tokens = [list(map(int, line.split())) for line in r.stdout.splitlines()]
    meta, arrays = [], {}
    for i, (c, toks) in enumerate(zip(cases(), tokens, strict=True)):
        arrays[f"logits_{i}"] = c.pop("logits")
        meta.append({**c, "llama_cpp_tokens": toks})
    np.savez_compressed(HERE / "llama_cpp_chain.npz", **arrays)
    (HERE / "llama_cpp_chain.json").write_text(json.dumps(meta, indent=0) + "\n")
    print(f"{len(meta)} cases, {sum(map(len, tokens))} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
