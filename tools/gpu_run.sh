#!/usr/bin/env bash
# The GPU checks and benchmarks of the fused and persistent decode steps, as run on the lent H200
# (device tool), from the project root with ../shared/device/{mlx-cuda,llamacpp-cuda} copied into
# .device/.
#   bash tools/gpu_run.sh setup     # MLX's CUDA wheel into /tmp/site; llama-bench built (background)
#   bash tools/gpu_run.sh tests     # the CUDA-only tests (the default model's too when
#                                   # QUANTREF_CACHE holds it)
#   bash tools/gpu_run.sh quick     # fused vs persistent decode, fp16, contexts 128 and 4096
#   bash tools/gpu_run.sh phases    # bench/decode_phases.py --persistent: what bounds the step
#   bash tools/gpu_run.sh bench     # bench/decode_speed.py with llama.cpp's and mlx-lm's rows
#   bash tools/gpu_run.sh crossover # bench/crossover.py: the model size where the GPU wins
#   bash tools/gpu_run.sh check     # the persistent step's GPU tests, its rows form's options
#   bash tools/gpu_run.sh final     # the remaining tests, then the same-run table (one lease)
#   bash tools/gpu_run.sh check2    # then, in the same lease, table: tests and options, then
#   bash tools/gpu_run.sh table     # the same-run table
# The default model is 94 MB and a call carries 64 MiB: .device/m1/part (its first 34,000,000
# bytes) and .device/m2/part (the rest) travel in two calls on the same machine:
#   bash tools/gpu_run.sh model1    # keeps the first part in /tmp
#   bash tools/gpu_run.sh model2    # joins it with the second into $QUANTREF_CACHE
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD
export MLX_ENABLE_TF32=0  # the plain graph's float32 matmuls in float32, as the oracle's
export QUANTREF_CACHE=${QUANTREF_CACHE:-/tmp/qcache}
case "${1:-}" in
setup)
  bash .device/mlx-cuda/install.sh
  (bash .device/llamacpp-cuda/build.sh > /tmp/llbuild.log 2>&1; echo "rc=$?" >> /tmp/llbuild.log) &
  ;;
model1)
  cp .device/m1/part /tmp/m1part
  ;;
model2)
  mkdir -p "$QUANTREF_CACHE"
  cat /tmp/m1part .device/m2/part > "$QUANTREF_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
  ls -la "$QUANTREF_CACHE"
  ;;
tests)
  python3 -m pytest -q -p no:cacheprovider -m "" tests/test_fused_decode.py \
    tests/test_fused_decode_gpu.py tests/test_persistent_decode_gpu.py \
    tests/test_turbo_prefill_gpu.py "${@:2}"
  ;;
quick)
  python3 bench/decode_speed.py --weights quantized --modes mlx,mlx-persistent --kv fp16 \
    --contexts 128,4096 "${@:2}"
  ;;
phases)
  python3 bench/decode_phases.py --weights quantized --persistent --kv fp16,turbo_kv_4b \
    --steps 50 "${@:2}"
  ;;
crossover)
  B=/tmp/llamacpp/llama.cpp/build/bin/llama-bench
  python3 bench/crossover.py --llama-bench "$B" --dir /tmp/crossover "${@:2}"
  ;;
bench)
  B=/tmp/llamacpp/llama.cpp/build/bin/llama-bench
  [ -x "$B" ] || { tail -5 /tmp/llbuild.log; exit 1; }
  xz -dc .device/llamacpp-cuda/smollm2-135m-header.Q4_1.gguf.xz > /tmp/h.gguf
  python3 .device/llamacpp-cuda/random_gguf.py /tmp/h.gguf /tmp/smollm2-random.gguf
  nvidia-smi --query-gpu=name,clocks.max.sm,memory.total,driver_version --format=csv,noheader
  python3 bench/decode_speed.py --weights quantized \
    --modes mlx,mlx-persistent,mlx-persistent-flags,mlx-plain \
    --kv fp16,turbo_kv_4b,turbo_kv_5b --contexts 128,1024,4096,8192 \
    --llama-bench "$B" --llama-gguf /tmp/smollm2-random.gguf --mlx-lm "${@:2}"
  ;;
session1)  # one lease, two calls back to back (the second within 30 s): checks, then figures
  O=${OUT:-/tmp/out}; mkdir -p "$O"
  bash "$0" setup > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_persistent_decode_gpu.py -k "(fp16 and (grid or rows)) or (turbo_kv_4b and \
    (grid or rows)) or turbo_kv_5b or outside or resident" > "$O/t_persistent.log" 2>&1
  tail -3 "$O/t_persistent.log"
  timeout 100 python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_turbo_prefill_gpu.py > "$O/t_prefill.log" 2>&1; tail -3 "$O/t_prefill.log"
  timeout 60 python3 bench/decode_speed.py --weights quantized --modes mlx-plain,mlx-plain-c \
    --kv fp16,turbo_kv_4b,turbo_kv_5b --contexts 128,1024 --steps 32 > "$O/plain.txt" 2>&1
  tail -14 "$O/plain.txt"
  timeout 45 python3 bench/decode_phases.py --weights quantized --persistent --kv fp16 \
    --steps 20 --ctx 128 > "$O/phases128.txt" 2>&1; grep -A6 Inside "$O/phases128.txt"
  timeout -s INT 30 python3 bench/crossover.py --shapes smollm2-135m --modes numpy --ctx 128 \
    --cap 1.5 --steps 16 --json "$O/cross_numpy.json" > "$O/cross_numpy.txt" 2>&1
  ;;
session2)
  O=${OUT:-/tmp/out}; mkdir -p "$O"; B=/tmp/llamacpp/llama.cpp/build/bin/llama-bench
  for i in $(seq 60); do [ -x "$B" ] && break; sleep 5; done
  xz -dc .device/llamacpp-cuda/smollm2-135m-header.Q4_1.gguf.xz > /tmp/h.gguf
  python3 .device/llamacpp-cuda/random_gguf.py /tmp/h.gguf /tmp/smollm2-random.gguf
  nvidia-smi --query-gpu=name,clocks.max.sm,memory.total,driver_version --format=csv,noheader
  timeout 250 python3 bench/decode_speed.py --weights quantized --steps 48 \
    --modes mlx,mlx-persistent,mlx-persistent-rows --kv fp16,turbo_kv_4b,turbo_kv_5b \
    --contexts 128,1024,4096,8192 --llama-bench "$B" --llama-gguf /tmp/smollm2-random.gguf \
    --mlx-lm --json "$O/bench.json" > "$O/bench.txt" 2> "$O/bench.err"; tail -42 "$O/bench.txt"
  timeout -s INT 300 python3 bench/crossover.py --llama-bench "$B" --dir /tmp/crossover \
    --modes mlx-op,mlx-plain,mlx,mlx-persistent,mlx-persistent-rows,llama.cpp --ctx 128 \
    --cap 1.0 --steps 48 --json "$O/cross.json" > "$O/cross.txt" 2> "$O/cross.err"
  tail -20 "$O/cross.txt"
  ;;
check)  # one lease: the new code's GPU tests, then the rows form's options compared (device
  # time per token, steps chained), then the timer marks of the default
  O=${OUT:-/tmp/out}; mkdir -p "$O"
  bash .device/mlx-cuda/install.sh > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  timeout 170 python3 -m pytest -q -p no:cacheprovider -m "not model" -x \
    tests/test_persistent_decode_gpu.py > "$O/t_persistent.log" 2>&1; tail -3 "$O/t_persistent.log"
  timeout 80 python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_fused_decode_gpu.py -k "launches or decode_steps" > "$O/t_fused.log" 2>&1
  tail -2 "$O/t_fused.log"
  P="python3 bench/decode_phases.py --weights quantized --persistent --no-host --chained-only \
    --kv fp16,turbo_kv_4b --ctx 128,1024,4096,8192 --steps 24"
  timeout 150 $P --forms rows --row-keys 0,64,32 --row-unroll 4 > "$O/sweep1.txt" 2>&1
  timeout 60 $P --forms rows:release,rows --row-keys 64 --row-unroll 8 > "$O/sweep2.txt" 2>&1
  grep "^| [0-9]" "$O/sweep1.txt" "$O/sweep2.txt" | cut -c1-200
  timeout 40 python3 bench/decode_phases.py --weights quantized --persistent --no-host \
    --forms rows --kv fp16 --ctx 128 --steps 20 > "$O/marks.txt" 2>&1; grep "^| [0-9]" "$O/marks.txt"
  ;;
final)  # one lease: the remaining GPU tests while llama.cpp builds, then the same-run table
  O=${OUT:-/tmp/out}; mkdir -p "$O"; B=/tmp/llamacpp/llama.cpp/build/bin/llama-bench
  bash "$0" setup > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  timeout 170 python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_persistent_decode_gpu.py -k "(turbo and (rows or release)) or (turbo_kv_5b and \
    grid) or outside or resident or sampled" > "$O/t_persistent.log" 2>&1
  tail -3 "$O/t_persistent.log"
  timeout 60 python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_fused_decode_gpu.py -k "launches" > "$O/t_fused.log" 2>&1; tail -2 "$O/t_fused.log"
  for i in $(seq 60); do [ -x "$B" ] && break; sleep 5; done
  xz -dc .device/llamacpp-cuda/smollm2-135m-header.Q4_1.gguf.xz > /tmp/h.gguf
  python3 .device/llamacpp-cuda/random_gguf.py /tmp/h.gguf /tmp/smollm2-random.gguf
  nvidia-smi --query-gpu=name,clocks.max.sm,memory.total,driver_version --format=csv,noheader
  timeout 330 python3 bench/decode_speed.py --weights quantized --steps 48 \
    --modes mlx,mlx-persistent-rows --kv fp16,turbo_kv_4b,turbo_kv_5b \
    --contexts 128,1024,4096,8192 --llama-bench "$B" --llama-gguf /tmp/smollm2-random.gguf \
    --mlx-lm --json "$O/bench.json" > "$O/bench.txt" 2> "$O/bench.err"; tail -34 "$O/bench.txt"
  timeout 45 python3 bench/decode_phases.py --weights quantized --persistent --no-host \
    --forms rows --kv fp16,turbo_kv_4b --ctx 128,4096 --steps 20 > "$O/marks.txt" 2>&1
  grep "^| [0-9]" "$O/marks.txt"
  ;;
check2)  # one lease, two calls (check2, then table within 30 s): tests and the rows form's
  # attention compared (a block per KV head or per head; the timer marks) while llama.cpp builds
  O=${OUT:-/tmp/out}; mkdir -p "$O"
  bash "$0" setup > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_persistent_decode_gpu.py -k "(fp16 and (rows or release)) or outside or \
    resident or sampled" > "$O/t_persistent.log" 2>&1; tail -3 "$O/t_persistent.log"
  timeout 150 python3 bench/decode_phases.py --weights quantized --persistent --no-host \
    --forms rows --kv fp16 --ctx 128,1024,4096,8192 --steps 16 --row-keys 64,128 \
    --row-group 1,0 > "$O/sweep.txt" 2>&1; grep "^| [0-9]" "$O/sweep.txt" | cut -c1-220
  ;;
table)
  O=${OUT:-/tmp/out}; mkdir -p "$O"; B=/tmp/llamacpp/llama.cpp/build/bin/llama-bench
  for i in $(seq 60); do [ -x "$B" ] && break; sleep 5; done
  xz -dc .device/llamacpp-cuda/smollm2-135m-header.Q4_1.gguf.xz > /tmp/h.gguf
  python3 .device/llamacpp-cuda/random_gguf.py /tmp/h.gguf /tmp/smollm2-random.gguf
  nvidia-smi --query-gpu=name,clocks.max.sm,memory.total,driver_version --format=csv,noheader
  timeout 340 python3 bench/decode_speed.py --weights quantized --steps 48 \
    --modes mlx,mlx-persistent-rows --kv fp16,turbo_kv_4b,turbo_kv_5b \
    --contexts 128,1024,4096,8192 --llama-bench "$B" --llama-gguf /tmp/smollm2-random.gguf \
    --mlx-lm --json "$O/bench.json" > "$O/bench.txt" 2> "$O/bench.err"; tail -34 "$O/bench.txt"
  ;;
lean)  # one call: checks and the timer marks while llama.cpp builds, then a short same-run
  # table (contexts 128 and 4096, no mlx-lm)
  O=${OUT:-/tmp/out}; mkdir -p "$O"; B=/tmp/llamacpp/llama.cpp/build/bin/llama-bench
  bash "$0" setup > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  timeout 100 python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_persistent_decode_gpu.py -k "rows and not rows16" > "$O/t_persistent.log" 2>&1
  tail -2 "$O/t_persistent.log"
  timeout 60 python3 bench/decode_phases.py --weights quantized --persistent --no-host \
    --forms rows --kv fp16,turbo_kv_4b --ctx 128,4096 --steps 16 > "$O/marks.txt" 2>&1
  grep "^| [0-9]" "$O/marks.txt"
  for i in $(seq 60); do [ -x "$B" ] && break; sleep 5; done
  xz -dc .device/llamacpp-cuda/smollm2-135m-header.Q4_1.gguf.xz > /tmp/h.gguf
  python3 .device/llamacpp-cuda/random_gguf.py /tmp/h.gguf /tmp/smollm2-random.gguf
  nvidia-smi --query-gpu=name,clocks.max.sm,memory.total,driver_version --format=csv,noheader
  timeout 200 python3 bench/decode_speed.py --weights quantized --steps 48 \
    --modes mlx,mlx-persistent-rows --kv fp16,turbo_kv_4b,turbo_kv_5b --contexts 128,4096 \
    --llama-bench "$B" --llama-gguf /tmp/smollm2-random.gguf --json "$O/bench.json" \
    > "$O/bench.txt" 2> "$O/bench.err"; tail -24 "$O/bench.txt"
  ;;
marks)  # the rows form's timer marks, the host reading them every fourth step
  O=${OUT:-/tmp/out}; mkdir -p "$O"
  bash .device/mlx-cuda/install.sh > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  timeout 80 python3 bench/decode_phases.py --weights quantized --persistent --no-host \
    --forms rows --kv fp16,turbo_kv_4b --ctx 128,4096 --steps 12 > "$O/marks.txt" 2>&1
  grep "^| [0-9]" "$O/marks.txt"
  ;;
last)  # the persistent step's GPU tests that the lean call's limit cut, on the code as it stands
  O=${OUT:-/tmp/out}; mkdir -p "$O"
  bash .device/mlx-cuda/install.sh > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  timeout 170 python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_persistent_decode_gpu.py -k "(turbo_kv_4b and (rows or grid)) or \
    (turbo_kv_5b and grid) or outside or resident or sampled" > "$O/t_persistent.log" 2>&1
  tail -3 "$O/t_persistent.log"
  ;;
*) echo "usage: $0 setup|model1|model2|tests|quick|phases|bench|crossover|session1|session2|check|final|check2|table|lean|marks|last"
   exit 2 ;;
esac
