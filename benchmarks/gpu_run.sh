#!/usr/bin/env bash
# Everything a session on a CUDA machine should produce, in as few commands as possible:
#   benchmarks/gpu_run.sh OUT_DIR build   # editable install, building the CPU and CUDA extensions (several minutes)
#   benchmarks/gpu_run.sh OUT_DIR tests   # the test suite on the GPU (Triton compiled, CUDA fallback built)
#   benchmarks/gpu_run.sh OUT_DIR train   # a short bf16 training run on the standard library's sources (train.log)
#   benchmarks/gpu_run.sh OUT_DIR bench   # every benchmark; bench.json and bench.txt in OUT_DIR
#   benchmarks/gpu_run.sh OUT_DIR all     # the four in turn
# Logs and results go to OUT_DIR; the last lines printed are a short summary. Commit the results under
# benchmarks/results/ with the device named (info.txt holds it).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_run.sh OUT_DIR [build|tests|bench|all]}
what=${2:-all}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

step_build() {
  # machine code for this GPU only (about half the nvcc time of setup.py's default sm_80 + sm_90)
  local arch
  arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  # (the machine has no network: nothing but this package is installed)
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-16} \
    python3 -m pip install -v --no-build-isolation --no-deps --no-index -e . >"$out/build.log" 2>&1
  local rc=$?
  echo "build: rc $rc (log: build.log; left out: $(cat kernels/_build.json 2>/dev/null | tr -d '\n'))"
  return $rc
}

step_tests() {
  # one Triton configuration per kernel: no autotuning at each new shape (the benchmarks tune); with
  # pytest-xdist, tests in several processes, so that Triton's first-use compiles run in parallel
  local workers=${TEST_WORKERS:-8} parallel=() threads=()
  if python3 -c "import xdist" 2>/dev/null; then
    parallel=(-n "$workers")
    threads=("OMP_NUM_THREADS=$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))")
  fi
  env "${threads[@]}" RECURSIVE_KERNELS_TRITON_AUTOTUNE=0 python3 -m pytest -q tests -p no:cacheprovider \
    --durations=20 "${parallel[@]}" >"$out/tests.log" 2>&1
  local rc=$?
  echo "tests: rc $rc, $(tail -n 1 "$out/tests.log")"
  return $rc
}

step_warm() {
  # The compile pass (benchmarks/common.py): the kernel benchmarks' cases dealt out to WARM_JOBS processes
  # and the model benchmark in one more, each running its cases once untimed, so that Triton compiles the
  # variants the timed run will load from its cache in parallel instead of one after another.
  local jobs=${WARM_JOBS:-12} i pid pids=() failed=0
  for ((i = 0; i < jobs; i++)); do
    RECURSIVE_KERNELS_BENCH_WARM="$i/$jobs" python3 -m recursive bench --no-progress \
      --full --only lowrank_linear --only circuit_attention >"$out/warm.$i.log" 2>&1 &
    pids+=($!)
  done
  RECURSIVE_KERNELS_BENCH_WARM=0/1 python3 -m recursive bench --full --no-progress --only model \
    >"$out/warm.model.log" 2>&1 &
  pids+=($!)
  for pid in "${pids[@]}"; do
    wait "$pid" || failed=$((failed + 1))
  done
  echo "warm: $failed of ${#pids[@]} compile processes failed (logs: warm.*.log)"
}

step_bench() {
  step_warm
  python3 -m recursive bench --full --no-progress --json "$out/bench.json" >"$out/bench.txt" 2>&1
  local rc=$?
  echo "bench: rc $rc (tables: bench.txt)"
  return $rc
}

step_train() {
  # the README's training example on the GPU (nccl is not exercised: one GPU), in bf16 autocast
  local stdlib
  stdlib=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
  timeout 300 python3 -m recursive train --data "$stdlib/*.py" --steps 300 --batch-size 32 --seq-len 128 \
    --eval-every 100 --bf16 --save "$out/train-run" --cache-dir "$out/token-cache" --no-progress >"$out/train.log" 2>&1
  local rc=$?
  rm -rf "$out/token-cache" "$out/train-run"/checkpoint-*
  echo "train: rc $rc, $(grep -E 'tokens/s' "$out/train.log" | tail -n 1)"
  return $rc
}

step_info() {
  python3 -m recursive info >"$out/info.txt" 2>&1
  grep -E "^(torch|triton|cuda) |^  (triton|cuda|cpp) " "$out/info.txt"
}

case "$what" in
  build) step_build; step_info ;;
  tests) step_info; step_tests ;;
  train) step_info; step_train ;;
  bench) step_info; step_bench ;;
  all) step_build; step_info && step_tests; step_train; step_bench ;;
  *) echo "unknown step: $what (build, tests, train, bench or all)" >&2; exit 2 ;;
esac
