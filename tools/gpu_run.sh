#!/usr/bin/env bash
# The GPU checks and benchmarks of the fused and persistent decode steps, as run on the lent H200
# (device tool), from the project root with ../shared/device/{mlx-cuda,llamacpp-cuda} copied into
# .device/. One call each, unless said:
#   bash tools/gpu_run.sh setup     # MLX's CUDA wheel into /tmp/site; llama-bench built (background)
#   bash tools/gpu_run.sh tests     # the CUDA-only tests (the default model's too when
#                                   # QUANTREF_CACHE holds it)
#   bash tools/gpu_run.sh quick     # fused vs persistent decode, fp16, contexts 128 and 4096
#   bash tools/gpu_run.sh phases    # bench/decode_phases.py --persistent: what bounds the step
#   bash tools/gpu_run.sh bench     # bench/decode_speed.py with llama.cpp's and mlx-lm's rows
#   bash tools/gpu_run.sh crossover # bench/crossover.py: the model size where the GPU wins
#   bash tools/gpu_run.sh final     # setup, GPU tests while llama.cpp builds, then the same-run
#                                   # table of docs/benchmarks.md §3
#   bash tools/gpu_run.sh lean      # the same, shorter: contexts 128 and 4096, no mlx-lm
#   bash tools/gpu_run.sh marks     # the persistent step's phases (docs/benchmarks.md §4)
#   bash tools/gpu_run.sh check     # GPU tests, then the rows form's options compared (§4)
#   bash tools/gpu_run.sh check2    # GPU tests, then its attention a block per KV head or per head
#   bash tools/gpu_run.sh last      # the persistent step's GPU tests the calls above left out
#   bash tools/gpu_run.sh probe     # turbo_kv prefill's kernel shapes (bench/prefill_speed.py),
#                                   # the persistent step's host time, the plain graph
#   bash tools/gpu_run.sh stop11a   # this change's GPU tests, prefill shapes; then within 30 s:
#   bash tools/gpu_run.sh stop11b   # the same-run table (llama.cpp built by stop11a's setup)
#   bash tools/gpu_run.sh stop11c   # the tests stop11a left out
#   bash tools/gpu_run.sh stop11d   # 8 tokens a launch against one: tests, figures, llama.cpp
#   bash tools/gpu_run.sh stop11f   # the several-token launches' GPU tests (the code as it stands)
#   bash tools/gpu_run.sh gap       # what reading each token back costs; marks; Decoder tests
#   bash tools/gpu_run.sh stop12a   # setup; the persistent step's grid sizes; then within 30 s:
#   bash tools/gpu_run.sh stop12b   # the same-run table (as stop11b)
#   bash tools/gpu_run.sh stop12c   # setup; GPU tests and marks of the attention a key a lane;
#                                   # then the same-run table with it (one call)
#   bash tools/gpu_run.sh stop12d   # the Decoder's and the rows form's GPU tests (the code since)
#   bash tools/gpu_run.sh stop13a   # setup; turbo_key.cuh's and the plain graph's GPU tests; the
#                                   # plain graph against fa6d5cc's; then within the idle window:
#   bash tools/gpu_run.sh stop13b   # the same-run table; the plain graph again
#   bash tools/gpu_run.sh stop13c   # the plain graph interleaved (bench/plain_graph.py), this tree
#                                   # and fa6d5cc's; the GPU tests stop13a cut short
#   bash tools/gpu_run.sh stop13d   # the GPU tests stop13c's time limits left out
#   bash tools/gpu_run.sh session1  # (an earlier lease's) checks, then within 30 s, same lease:
#   bash tools/gpu_run.sh session2  # its figures
# The default model is 94 MB and a call carries 64 MiB: .device/m1/part (its first 34,000,000
# bytes) and .device/m2/part (the rest) travel in two calls on the same machine:
#   bash tools/gpu_run.sh model1    # keeps the first part in /tmp
#   bash tools/gpu_run.sh model2    # joins it with the second into $QUANTREF_CACHE
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD
export MLX_ENABLE_TF32=0  # the plain graph's float32 matmuls in float32, as the oracle's
export QUANTREF_CACHE=${QUANTREF_CACHE:-/tmp/qcache}
O=${OUT:-/tmp/out}
B=/tmp/llamacpp/llama.cpp/build/bin/llama-bench
LLAMA=(--llama-bench "$B" --llama-gguf /tmp/smollm2-random.gguf)

llama_model() {  # wait (at most 5 min) for setup's llama-bench build; SmolLM2's header filled
  for _ in $(seq 60); do  # built, and the build's script gone (the link done)
    [ -x "$B" ] && ! pgrep -f "llamacpp-cuda/build.sh" > /dev/null && break; sleep 5
  done
  [ -x "$B" ] || { tail -5 /tmp/llbuild.log; return 1; }
  xz -dc .device/llamacpp-cuda/smollm2-135m-header.Q4_1.gguf.xz > /tmp/h.gguf
  python3 .device/llamacpp-cuda/random_gguf.py /tmp/h.gguf /tmp/smollm2-random.gguf
  nvidia-smi --query-gpu=name,clocks.max.sm,memory.total,driver_version --format=csv,noheader
}
persistent_tests() {  # $1: seconds at most; $2: pytest's -k
  timeout "$1" python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_persistent_decode_gpu.py -k "$2" > "$O/t_persistent.log" 2>&1
  tail -3 "$O/t_persistent.log"
}
plain_bench() {  # $1: new (this tree) or old (.device/old: quantref_mlx and bench of fa6d5cc)
  local root=$PWD; [ "$1" = old ] && root=$PWD/.device/old
  PYTHONPATH=/tmp/site:$root:$PWD timeout 100 python3 "$root/bench/decode_speed.py" \
    --weights quantized --modes mlx-plain,mlx-plain-c --kv fp16,turbo_kv_4b,turbo_kv_5b \
    --contexts 128,1024 --steps 32 > "$O/plain_$1_$SECONDS.txt" 2>&1
  echo "plain graph, $1:"; grep -h "^| [0-9]\|^plain" "$O"/plain_"$1"_*.txt | tail -12
}
# the rows form's timer marks (decode_phases.py), its arguments to follow
PHASES_ROWS=(python3 bench/decode_phases.py --weights quantized --persistent --no-host --forms rows)

mkdir -p "$O"
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
  python3 bench/crossover.py --llama-bench "$B" --dir /tmp/crossover "${@:2}"
  ;;
bench)
  llama_model || exit 1
  python3 bench/decode_speed.py --weights quantized \
    --modes mlx,mlx-persistent,mlx-persistent-flags,mlx-plain \
    --kv fp16,turbo_kv_4b,turbo_kv_5b --contexts 128,1024,4096,8192 "${LLAMA[@]}" --mlx-lm "${@:2}"
  ;;
probe)  # turbo_kv prefill's kernel shapes, the persistent step's host time, the plain graph
  bash .device/mlx-cuda/install.sh > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  timeout 200 python3 bench/prefill_speed.py --contexts 128,1024,4096,8192 \
    --variants 4x32,8x32,16x32,8x16,16x64 --kv turbo_kv_4b > "$O/prefill.txt" 2> "$O/prefill.err"
  grep "^| [0-9]" "$O/prefill.txt"
  timeout 60 python3 bench/decode_phases.py --weights quantized --persistent --forms rows \
    --kv fp16 --ctx 128,4096 --steps 40 > "$O/phases.txt" 2>&1; grep "^|" "$O/phases.txt" | cut -c1-200
  timeout 90 python3 bench/decode_speed.py --weights quantized --modes mlx-plain,mlx-plain-c \
    --kv fp16,turbo_kv_4b,turbo_kv_5b --contexts 128,1024 --steps 32 > "$O/plain.txt" 2>&1
  grep "^| [0-9]" "$O/plain.txt"
  ;;
stop11a)  # setup, llama.cpp's build in the background; the GPU tests of this change; prefill shapes
  bash "$0" setup > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  persistent_tests 200 "tokens_of_one_launch or decoder_takes or outside or sampled or \
    (resident and grid) or (bit_for_bit and rows and not rows16 and not rows8 and not rowsgroup)"
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_turbo_prefill_gpu.py > "$O/t_prefill.log" 2>&1; tail -3 "$O/t_prefill.log"
  timeout 150 python3 bench/prefill_speed.py --contexts 128,1024,4096,8192 \
    --variants auto,16x10,4x10 --kv turbo_kv_4b,turbo_kv_5b > "$O/prefill.txt" 2> "$O/prefill.err"
  grep "^| [0-9]" "$O/prefill.txt"; tail -2 "$O/prefill.err"
  ;;
stop11b)  # within 30 s of stop11a, same lease: the same-run table (docs/benchmarks.md section 3)
  llama_model || exit 1
  timeout 420 python3 bench/decode_speed.py --weights quantized --steps 48 \
    --modes mlx,mlx-persistent-rows,mlx-persistent-rows8 --kv fp16,turbo_kv_4b,turbo_kv_5b \
    --contexts 128,1024,4096,8192 "${LLAMA[@]}" --mlx-lm --json "$O/bench.json" \
    > "$O/bench.txt" 2> "$O/bench.err"; grep "^| [0-9]" "$O/bench.txt"; tail -3 "$O/bench.err"
  ;;
stop11c)  # after Decoder's default went back to one token a launch: the tests stop11a left out
  bash .device/mlx-cuda/install.sh > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  persistent_tests 230 "decoder_takes or (bit_for_bit and (grid or flags) and not release)"
  timeout 220 python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_turbo_prefill_gpu.py > "$O/t_prefill.log" 2>&1; tail -3 "$O/t_prefill.log"
  ;;
stop11d)  # 8 tokens a launch: the tests, then against one a launch and llama.cpp
  bash "$0" setup > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  persistent_tests 150 "tokens_of_one_launch or decoder_takes"
  llama_model || exit 1
  timeout 300 python3 bench/decode_speed.py --weights quantized --steps 48 \
    --modes mlx,mlx-persistent-rows,mlx-persistent-rows8 --kv fp16 \
    --contexts 128,1024,4096,8192 "${LLAMA[@]}" --json "$O/bench8.json" \
    > "$O/bench8.txt" 2> "$O/bench8.err"; grep "^| [0-9]" "$O/bench8.txt"; tail -3 "$O/bench8.err"
  ;;
stop11f)  # the Decoder's several-token launches as committed: their GPU tests
  bash .device/mlx-cuda/install.sh > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  persistent_tests 150 "tokens_of_one_launch or decoder_takes or outside"
  ;;
session1)
  bash "$0" setup > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  persistent_tests 120 "(fp16 and (grid or rows)) or (turbo_kv_4b and (grid or rows)) or \
    turbo_kv_5b or outside or resident"
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
  llama_model || exit 1
  timeout 250 python3 bench/decode_speed.py --weights quantized --steps 48 \
    --modes mlx,mlx-persistent,mlx-persistent-rows --kv fp16,turbo_kv_4b,turbo_kv_5b \
    --contexts 128,1024,4096,8192 "${LLAMA[@]}" --mlx-lm --json "$O/bench.json" \
    > "$O/bench.txt" 2> "$O/bench.err"; tail -42 "$O/bench.txt"
  timeout -s INT 300 python3 bench/crossover.py --llama-bench "$B" --dir /tmp/crossover \
    --modes mlx-op,mlx-plain,mlx,mlx-persistent,mlx-persistent-rows,llama.cpp --ctx 128 \
    --cap 1.0 --steps 48 --json "$O/cross.json" > "$O/cross.txt" 2> "$O/cross.err"
  tail -20 "$O/cross.txt"
  ;;
check)
  bash .device/mlx-cuda/install.sh > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  persistent_tests 170 ""
  timeout 80 python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_fused_decode_gpu.py -k "launches or decode_steps" > "$O/t_fused.log" 2>&1
  tail -2 "$O/t_fused.log"
  P=(--generation-only --kv fp16,turbo_kv_4b --ctx 128,1024,4096,8192 --steps 24)
  timeout 150 "${PHASES_ROWS[@]}" "${P[@]}" --row-keys 0,64,32 --row-unroll 4 > "$O/sweep1.txt" 2>&1
  timeout 60 "${PHASES_ROWS[@]}" "${P[@]}" --forms rows:release,rows --row-keys 64 --row-unroll 8 \
    > "$O/sweep2.txt" 2>&1
  grep "^| [0-9]" "$O/sweep1.txt" "$O/sweep2.txt" | cut -c1-200
  ;;
check2)
  bash "$0" setup > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  persistent_tests 150 "(fp16 and (rows or release)) or outside or resident or sampled"
  timeout 150 "${PHASES_ROWS[@]}" --kv fp16 --ctx 128,1024,4096,8192 --steps 16 --row-keys 64,128 \
    --row-group 1,0 > "$O/sweep.txt" 2>&1; grep "^| [0-9]" "$O/sweep.txt" | cut -c1-220
  ;;
final|lean)
  bash "$0" setup > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  if [ "$1" = final ]; then
    persistent_tests 170 "(turbo and (rows or release)) or (turbo_kv_5b and grid) or outside \
      or resident or sampled"
    timeout 60 python3 -m pytest -q -p no:cacheprovider -m "not model" \
      tests/test_fused_decode_gpu.py -k "launches" > "$O/t_fused.log" 2>&1
    tail -2 "$O/t_fused.log"
    C=(--contexts 128,1024,4096,8192 --mlx-lm)
  else
    persistent_tests 100 "rows and not rows16"
    timeout 60 "${PHASES_ROWS[@]}" --kv fp16,turbo_kv_4b --ctx 128,4096 --steps 16 > "$O/marks.txt" 2>&1
    grep "^| [0-9]" "$O/marks.txt"
    C=(--contexts 128,4096)
  fi
  llama_model || exit 1
  timeout 340 python3 bench/decode_speed.py --weights quantized --steps 48 \
    --modes mlx,mlx-persistent-rows --kv fp16,turbo_kv_4b,turbo_kv_5b "${C[@]}" "${LLAMA[@]}" \
    --json "$O/bench.json" > "$O/bench.txt" 2> "$O/bench.err"; tail -34 "$O/bench.txt"
  ;;
marks)
  bash .device/mlx-cuda/install.sh > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  timeout 80 "${PHASES_ROWS[@]}" --kv fp16,turbo_kv_4b --ctx 128,4096 --steps 12 > "$O/marks.txt" 2>&1
  grep "^| [0-9]" "$O/marks.txt"
  ;;
last)
  bash .device/mlx-cuda/install.sh > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  persistent_tests 170 "(turbo_kv_4b and (rows or grid)) or (turbo_kv_5b and grid) or outside \
    or resident or sampled"
  ;;
stop12a)  # setup (llama.cpp's build in the background); the persistent step's grid sizes
  bash "$0" setup > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  timeout 200 "${PHASES_ROWS[@]}" --kv fp16,turbo_kv_4b --ctx 128,4096 --steps 24 \
    --blocks 44,66,99,132 > "$O/blocks.txt" 2>&1; grep "^| [0-9]" "$O/blocks.txt" | cut -c1-230
  timeout 60 "${PHASES_ROWS[@]}" --kv fp16 --ctx 128,4096 --steps 24 --warps 8 \
    > "$O/warps.txt" 2>&1; grep "^| [0-9]" "$O/warps.txt" | cut -c1-230
  ;;
stop12b)  # within 30 s of stop12a, same lease: the same-run table (docs/benchmarks.md section 3)
  bash "$0" stop11b
  ;;
stop12c)  # one call: setup, llama.cpp's build (niced, in the background) while the GPU tests of
  # the rows form's attention a key a lane and its marks run; then the same-run table with it.
  # As run at commit dcfd75e, whose experiment (row_lanes, --row-lanes, the mode
  # mlx-persistent-lanes) the next commit removed: run it there (git checkout dcfd75e)
  bash .device/mlx-cuda/install.sh > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  (nice -n 19 bash .device/llamacpp-cuda/build.sh > /tmp/llbuild.log 2>&1
   echo "rc=$?" >> /tmp/llbuild.log) &
  persistent_tests 220 "lanes or decoder_takes or tokens_of_one_launch or (rows and 600)"
  timeout 100 "${PHASES_ROWS[@]}" --kv fp16 --ctx 128,4096 --steps 24 --row-lanes 0,1 \
    > "$O/lanes.txt" 2>&1; grep "^| [0-9]" "$O/lanes.txt" | cut -c1-230
  llama_model || exit 1
  timeout 300 python3 bench/decode_speed.py --weights quantized --steps 48 \
    --modes mlx,mlx-persistent-rows,mlx-persistent-lanes --kv fp16,turbo_kv_4b,turbo_kv_5b \
    --contexts 128,1024,4096,8192 "${LLAMA[@]}" --mlx-lm --json "$O/bench.json" \
    > "$O/bench.txt" 2> "$O/bench.err"; grep "^| [0-9]" "$O/bench.txt"; tail -3 "$O/bench.err"
  ;;
stop12d)  # the code as it stands after stop12c: the Decoder's bookkeeping and the rows form
  bash .device/mlx-cuda/install.sh > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  persistent_tests 170 "decoder_takes or tokens_of_one_launch or sampled or outside or \
    (resident and grid) or (fp16 and rows- and 600)"
  ;;
gap)  # what reading each token back costs (bench/host_read.py), the step's marks, Decoder tests
  bash .device/mlx-cuda/install.sh > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  timeout 240 python3 bench/host_read.py --contexts 128,4096 --kv fp16,turbo_kv_4b \
    > "$O/host_read.txt" 2> "$O/host_read.err"; cat "$O/host_read.txt"; tail -3 "$O/host_read.err"
  timeout 90 python3 bench/decode_phases.py --weights quantized --persistent --forms rows \
    --kv fp16 --ctx 128,4096 --steps 24 > "$O/phases.txt" 2>&1; grep "^|" "$O/phases.txt" | cut -c1-220
  persistent_tests 150 "decoder_takes or tokens_of_one_launch or sampled or outside"
  ;;
stop13a)  # setup, llama.cpp's build (niced, background); the GPU tests of turbo_key.cuh (the
  # prefill kernels, the fused and persistent steps) and of the plain graph's compiled scores;
  # the plain graph against main before it (fa6d5cc, copied into .device/old), same call
  bash .device/mlx-cuda/install.sh > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  (nice -n 19 bash .device/llamacpp-cuda/build.sh > /tmp/llbuild.log 2>&1
   echo "rc=$?" >> /tmp/llbuild.log) &
  timeout 130 python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_turbo_prefill_gpu.py > "$O/t_prefill.log" 2>&1; tail -2 "$O/t_prefill.log"
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_mlx_turbo_kv.py \
    -k "compiled_scores or scores_within or codebook" > "$O/t_mlx_turbo.log" 2>&1
  tail -2 "$O/t_mlx_turbo.log"
  timeout 110 python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_fused_decode_gpu.py -k "match_the_plain_graph or (one_layer and 5b)" \
    > "$O/t_fused.log" 2>&1; tail -2 "$O/t_fused.log"
  persistent_tests 100 "(turbo and rows- and 600) or (turbo_kv_5b and grid)"
  plain_bench new; plain_bench old
  llama_model || exit 1
  ;;
stop13b)  # within the idle window after stop13a, same machine: the same-run table (llama.cpp
  # built by stop13a), then the plain graph again (old first this time)
  plain_bench old; plain_bench new
  llama_model || exit 1
  timeout 330 python3 bench/decode_speed.py --weights quantized --steps 48 \
    --modes mlx,mlx-persistent-rows --kv fp16,turbo_kv_4b,turbo_kv_5b \
    --contexts 128,1024,4096,8192 "${LLAMA[@]}" --json "$O/bench.json" \
    > "$O/bench.txt" 2> "$O/bench.err"; grep "^| [0-9]" "$O/bench.txt"; tail -3 "$O/bench.err"
  ;;
stop13c)  # the plain graph interleaved (bench/plain_graph.py), this tree and fa6d5cc's; then the
  # GPU tests stop13a's llama.cpp build starved of CPU (cut by their time limits)
  bash .device/mlx-cuda/install.sh > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  for tree in new old new; do
    root=$PWD; [ $tree = old ] && root=$PWD/.device/old
    echo "plain graph, $tree:"
    PYTHONPATH=/tmp/site:$root:$PWD timeout 80 python3 bench/plain_graph.py --rounds 7 \
      > "$O/plain_graph_${tree}_$SECONDS.txt" 2>&1; grep -h "^| [0-9]" "$O"/plain_graph_${tree}_*.txt | tail -6
  done
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_turbo_prefill_gpu.py > "$O/t_prefill.log" 2>&1; tail -2 "$O/t_prefill.log"
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_mlx_turbo_kv.py \
    -k "compiled_scores or scores_within or codebook" > "$O/t_mlx_turbo.log" 2>&1
  tail -2 "$O/t_mlx_turbo.log"
  timeout 100 python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_fused_decode_gpu.py -k "match_the_plain_graph or (one_layer and 5b and fp16)" \
    > "$O/t_fused.log" 2>&1; tail -2 "$O/t_fused.log"
  persistent_tests 90 "(turbo and rows- and 600) or (turbo_kv_5b and grid and 20)"
  ;;
stop13d)  # the GPU tests stop13c's time limits left out
  bash .device/mlx-cuda/install.sh > "$O/setup.log" 2>&1; tail -1 "$O/setup.log"
  persistent_tests 100 "turbo_kv_5b and grid and 20"
  timeout 60 python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_turbo_prefill_gpu.py -k "rows_keep or (plain_graph and (5b-fp32_codebook-q4 or \
    3b-dequant or q2))" > "$O/t_prefill.log" 2>&1; tail -2 "$O/t_prefill.log"
  timeout 110 python3 -m pytest -q -p no:cacheprovider -m "not model" \
    tests/test_fused_decode_gpu.py -k "match_the_plain_graph and (hd32-600 or (hd32-20 and not \
    int8_codebook-fp16))" > "$O/t_fused.log" 2>&1; tail -2 "$O/t_fused.log"
  ;;
*) echo "usage: $0 setup|model1|model2|tests|quick|phases|bench|crossover|final|lean|marks|check|check2|last|probe|gap|stop11a..f|stop12a|stop12b|stop12c|stop12d|stop13a|stop13b|stop13c|stop13d|session1|session2"
   exit 2 ;;
esac
