"""Reference logits for tiny random GGUFs of each architecture, computed by llama.cpp.

Writes ``tests/data/arch_logits.npz``: for each case of :data:`CASES`, the token ids fed
(``<case>/ids``) and llama.cpp's logits for every position (``<case>/logits``, float32
``[T, vocab]``). ``tests/test_architectures.py`` rebuilds each model with the same
:func:`quantref.testing.write_tiny` arguments (the same seed gives the same bytes) and checks
quantref's logits against these.

llama.cpp is llama-cpp-python 0.3.36 (llama.cpp 0c1e570), built once in its own venv:

    python3 -m venv /tmp/llvenv
    CMAKE_BUILD_PARALLEL_LEVEL=1 /tmp/llvenv/bin/pip install llama-cpp-python==0.3.36 numpy gguf==0.19.0

Run from the repository root with the project's venv (it writes the models, then runs itself
under the llama-cpp-python interpreter for the logits):

    python tests/data/make_arch_logits.py --llama-python /tmp/llvenv/bin/python

Or in two steps: ``--prepare DIR`` writes the models and ``DIR/jobs.json``; ``--child
DIR/jobs.json --out FILE`` (under an interpreter that imports llama_cpp) computes the logits.
The stored file was made that way: ``llama_cpp`` from the llama-cpp-python 0.3.36 sdist, over
the shared libraries pip's build of that sdist had linked (``LLAMA_CPP_LIB_PATH`` pointing at
its build folder's ``bin``; pip was still compiling the other targets on this 2-core VM).

llama.cpp runs on the CPU, one thread, with an F32 KV cache and without flash attention, so that
its float32 arithmetic differs from ours only in summation order (and, for gemma3, in GELU:
ggml's CPU build reads GELU from a float16 table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "arch_logits.npz"
N_TOKENS = 24  # longer than gemma3's window of 8 below, so the window is exercised

# case -> quantref.testing.write_tiny arguments (F32 weights: llama.cpp and quantref then
# compute with the same float32 numbers).
CASES: dict[str, dict] = {
    # Q/K/V biases and an untied output projection
    "qwen2": dict(arch="qwen2", tied_embeddings=False, rope_base=1_000_000.0, norm_eps=1e-6,
                  seed=21),
    # Q/K norms; a head_dim (key_length) other than dim / n_heads, as Qwen3 has
    "qwen3": dict(arch="qwen3", head_dim=32, rope_base=1_000_000.0, norm_eps=1e-6, seed=22),
    # fused attn_qkv and gate|up ffn_up
    "phi3": dict(arch="phi3", n_kv_heads=4, tied_embeddings=False, seed=23),
    # Llama 3.1-style rope_freqs.weight frequency divisors
    "llama_rope_freqs": dict(arch="llama", rope_freqs=True, rope_base=500_000.0, seed=24),
    # everything of Gemma 3: 3 layers, the last global, the first two on a window of 8
    "gemma3": dict(arch="gemma3", n_layers=3, n_heads=2, n_kv_heads=1, head_dim=64,
                   hidden_dim=128, rope_base=1_000_000.0, norm_eps=1e-6, sliding_window=8,
                   sliding_window_pattern=3, add_bos=True, seed=25),
}


def token_ids(case: str) -> list[int]:
    """The ids fed for ``case``: a fixed pseudo-random sequence over the tiny vocabulary."""
    import numpy as np

    from quantref.testing import VOCAB_SIZE

    seed = CASES[case]["seed"]
    return np.random.default_rng(1000 + seed).integers(3, VOCAB_SIZE, N_TOKENS).tolist()


def write_models(directory: Path) -> dict[str, str]:
    from quantref.testing import write_tiny

    return {case: str(write_tiny(directory / f"{case}.gguf", **args))
            for case, args in CASES.items()}


def prepare(directory: Path, out: Path) -> Path:
    """The models and ``jobs.json`` (model paths relative to it) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = write_models(directory)
    jobs = {"out": str(out),
            "cases": {c: {"path": Path(paths[c]).name, "ids": token_ids(c)} for c in CASES}}
    spec = directory / "jobs.json"
    spec.write_text(json.dumps(jobs))
    return spec


def llama_cpp_logits(jobs: dict) -> None:
    """Under llama-cpp-python's interpreter: logits of every position of each model."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    out = {}
    for case, job in jobs["cases"].items():
        llm = Llama(model_path=str(Path(jobs["dir"]) / job["path"]), n_ctx=64, n_batch=64, n_ubatch=64, n_threads=1,
                    logits_all=True, verbose=False, type_k=0, type_v=0,  # GGML_TYPE_F32
                    flash_attn=False)
        llm.eval(job["ids"])
        out[f"{case}/ids"] = np.asarray(job["ids"], dtype=np.int32)
        out[f"{case}/logits"] = np.asarray(llm.scores[: len(job["ids"])], dtype=np.float32)
        del llm
    out["llama_cpp_python_version"] = np.asarray(llama_cpp.__version__)
    np.savez_compressed(jobs["out"], **out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama-python", default="/tmp/llvenv/bin/python",
                   help="the interpreter that has llama-cpp-python 0.3.36")
    p.add_argument("--prepare", metavar="DIR", help="only write the models and DIR/jobs.json")
    p.add_argument("--child", metavar="JOBS", help="compute the logits of JOBS (a jobs.json)")
    p.add_argument("--out", default=str(OUT), help="where the logits go (default: %(default)s)")
    args = p.parse_args()
    if args.child:
        jobs = json.loads(Path(args.child).read_text())
        jobs.update(dir=str(Path(args.child).parent), out=args.out)
        llama_cpp_logits(jobs)
        print(f"wrote {args.out}")
        return
    sys.path.insert(0, str(HERE.parent.parent))
    if args.prepare:
        print(f"wrote {prepare(Path(args.prepare), Path(args.out))}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        spec = prepare(Path(tmp), Path(args.out))
        subprocess.run([args.llama_python, __file__, "--child", str(spec), "--out", args.out],
                       check=True)


if __name__ == "__main__":
    main()
