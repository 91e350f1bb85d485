#!/usr/bin/env bash
# The GPU checks and benchmarks of the fused decode step, as run on the lent H200 (device tool),
# from the project root with ../shared/device/{mlx-cuda,llamacpp-cuda} copied into .device/.
#   bash tools/gpu_run.sh setup     # MLX's CUDA wheel into /tmp/site; llama-bench built
#   bash tools/gpu_run.sh tests     # tests/test_fused_decode*.py (the default model's test too
#                                   # when QUANTREF_CACHE holds it)
#   bash tools/gpu_run.sh bench     # bench/decode_speed.py with llama.cpp's and mlx-lm's rows
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD
export MLX_ENABLE_TF32=0  # the plain graph's float32 matmuls in float32, as the oracle's
case "${1:-}" in
setup)
  bash .device/mlx-cuda/install.sh
  (bash .device/llamacpp-cuda/build.sh > /tmp/llbuild.log 2>&1; echo "rc=$?" >> /tmp/llbuild.log) &
  ;;
tests)
  python3 -m pytest -q -p no:cacheprovider tests/test_fused_decode.py tests/test_fused_decode_gpu.py \
    "${@:2}"
  ;;
bench)
  B=/tmp/llamacpp/llama.cpp/build/bin/llama-bench
  [ -x "$B" ] || { tail -5 /tmp/llbuild.log; exit 1; }
  xz -dc .device/llamacpp-cuda/smollm2-135m-header.Q4_1.gguf.xz > /tmp/h.gguf
  python3 .device/llamacpp-cuda/random_gguf.py /tmp/h.gguf /tmp/smollm2-random.gguf
  nvidia-smi --query-gpu=name,clocks.max.sm,memory.total,driver_version --format=csv,noheader
  python3 bench/decode_speed.py --weights quantized --modes mlx,mlx-plain \
    --kv fp16,turbo_kv_4b,turbo_kv_5b --contexts 128,1024,4096 \
    --llama-bench "$B" --llama-gguf /tmp/smollm2-random.gguf --mlx-lm "${@:2}"
  ;;
*) echo "usage: $0 setup|tests|bench"; exit 2 ;;
esac
