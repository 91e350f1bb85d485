"""Make llama_cpp_verdicts.json: llama.cpp's own verdict on every case file of
tests/test_gguf.py (LLAMA_CPP_RULES, STRICTER_THAN_LLAMA_CPP, GOLDEN_VALID).

llama.cpp is the copy vendored in llama-cpp-python 0.3.36 (../shared/device/llamacpp-cuda/
llamacpp-src.tar.xz, commit 0c1e570). Only its ggml-base library is built (gguf.cpp and what it
links), then llama_cpp_gguf_check.cpp runs gguf_init_from_file and llama_model_loader's bounds
check on each file. Run from the repository root (~3 minutes on 2 cores, most of it the build):

    python tests/data/gguf_rules/make_golden.py [--src-tar PATH] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def build_checker(src_tar: Path, work: Path) -> Path:
    src = work / "llama.cpp"
    if not src.exists():
        with tarfile.open(src_tar) as t:
            t.extractall(work, filter="data")
    build = work / "build"
    if not (build / "ggml/src/libggml-base.a").exists():
        subprocess.run(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                        "-DLLAMA_BUILD_SERVER=OFF"], check=True, capture_output=True)
        subprocess.run(["cmake", "--build", build, "--target", "ggml-base", "-j2"], check=True,
                       capture_output=True)
    exe = work / "gguf_check"
    subprocess.run(["g++", "-O1", "-std=c++17", f"-I{src / 'ggml/include'}",
                    HERE / "llama_cpp_gguf_check.cpp", build / "ggml/src/libggml-base.a",
                    "-fopenmp", "-lpthread", "-lm", "-o", exe], check=True)
    return exe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src-tar", type=Path,
                    default=ROOT.parent / "shared/device/llamacpp-cuda/llamacpp-src.tar.xz")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llamacpp-gguf")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    exe = build_checker(args.src_tar, args.work)

    sys.path.insert(0, str(ROOT / "tests"))
    import test_gguf as t  # the case builders

    cases = {**t.LLAMA_CPP_RULES, **t.STRICTER_THAN_LLAMA_CPP, **t.GOLDEN_VALID}
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for name, case in cases.items():
            parts, _ = case.build()
            path = t.write_parts(Path(d) / "case.gguf", parts)
            r = subprocess.run([exe, path], capture_output=True, text=True, timeout=60)
            log = [line for line in r.stderr.splitlines() if line.strip()]
            out[name] = {"sha256": t.parts_digest(parts), "verdict": r.stdout.strip(),
                         "llama_cpp_log": log[:3]}
            print(f"{out[name]['verdict']:9} {name}: {' | '.join(log[:1])}")
            path.unlink()
    (HERE / "llama_cpp_verdicts.json").write_text(json.dumps(out, indent=1, ensure_ascii=False)
                                                 + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
