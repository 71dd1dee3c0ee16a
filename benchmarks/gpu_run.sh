#!/usr/bin/env bash
# One time-boxed call on a CUDA machine (a lent GPU allows one 10-minute call): evidence first.
#
#   benchmarks/gpu_run.sh OUT_DIR          every step in order, each under its own cap (about 9 minutes)
#   benchmarks/gpu_run.sh --plan           the steps, their caps and the total; runs nothing
#   benchmarks/gpu_run.sh --cpu OUT_DIR    the same steps on this CPU, small (a dry run of the script)
#
# The Triton backend runs from the source folders, without any pip build: a temporary folder on PYTHONPATH
# maps the import names (recursive_kernels -> kernels/, recursive_benchmarks -> benchmarks/). The CUDA extension
# builds in a copy of the checkout, in the background at low priority, and is tested last if it finished.
#
# OUT_DIR receives at most 8 files, written as the steps end, so that a run cut short keeps what it did:
#   summary.txt    one line per step as it ends (rc, seconds, result), after the machine's description
#   tests.log      the Triton correctness tests (pytest -v -rfE)
#   sweep.jsonl    the all-configuration sweep, one JSON record per (kernel, configuration, case)
#   lowrank.json, attention.json, model.json    the benchmarks' results
#   tuning.json    the autotuner's choices of the benchmark runs (copy to kernels/triton_tuning.json to keep)
#   logs.tar.gz    every step's full log (rebuilt after each step)
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

# name:cap seconds:what it does. The order is the order of importance: a cut run loses the end.
STEPS=(
  "env:15:nvidia-smi, driver, CUDA, torch and Triton versions, the package's backends"
  "correctness:90:Triton lowrank_linear and circuit_attention tests (smallest configurations, 8 workers)"
  "sweep:90:every autotuning configuration of every Triton kernel at production shapes, fp16/bf16/fp32"
  "lowrank:90:bench lowrank_linear (vs eager, compiled, PEFT)"
  "attention:100:bench circuit_attention (S = 4096 and 1024, vs sdpa, eager and compiled)"
  "model:75:bench model (relaxed and untied, fused vs torch)"
  "engine:30:the engine's host-synchronisation counts (tests)"
  "cuda:40:the CUDA extension's tests, if its background build finished"
)

plan() {
  local total=0 line name cap what
  for line in "${STEPS[@]}"; do
    IFS=: read -r name cap what <<<"$line"
    total=$((total + cap))
    printf '%-12s %4d s  (by %4d s)  %s\n' "$name" "$cap" "$total" "$what"
  done
  echo "total: $total s"
}

cpu=0
case "${1:-}" in
  --plan) plan; exit 0 ;;
  --cpu) cpu=1; shift ;;
esac
out=${1:?usage: benchmarks/gpu_run.sh [--plan | --cpu] OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
logs="$work/logs"
mkdir -p "$logs" "$work/site"
ln -s "$here/kernels" "$work/site/recursive_kernels"
ln -s "$here/benchmarks" "$work/site/recursive_benchmarks"
export PYTHONPATH="$work/site:$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$here"
if ((cpu)); then
  device=cpu
  export TRITON_INTERPRET=1
else
  device=cuda
fi
# the benchmarks' autotuning choices are merged into one table as each process ends (kernels/triton_tuning.py)
bench=(env RECURSIVE_KERNELS_TRITON_TUNING_OUT="$out/tuning.json" python3 -m recursive bench --device "$device"
  --no-progress)

step_env() {
  date -u
  nvidia-smi || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
  nvcc --version 2>/dev/null | tail -n 1
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__,
'cuda', torch.version.cuda); print('triton', triton.__version__)"
  python3 -m recursive info
}

step_correctness() {
  local parallel=()
  if python3 -c "import xdist" 2>/dev/null && ((!cpu)); then parallel=(-n 8); fi
  # only the Triton rows: the cpp extension is not built here, the CUDA one comes last
  RECURSIVE_KERNELS_TRITON_AUTOTUNE=0 python3 -m pytest tests/test_lowrank_linear.py tests/test_circuit_attention.py \
    -k "triton" -v -rfE -p no:cacheprovider "${parallel[@]}" $(timeout_flag 60) 2>&1 | tee "$out/tests.log"
}

step_sweep() {
  local size=()
  if ((cpu)); then size=(--small --jobs 1); fi
  python3 -m recursive_benchmarks.gpu_sweep --out "$out/sweep.jsonl" --seconds 80 "${size[@]}"
}

step_lowrank() { "${bench[@]}" --only lowrank_linear --json "$out/lowrank.json" && echo "result: lowrank.json"; }
step_attention() { "${bench[@]}" --only circuit_attention --json "$out/attention.json" && echo "result: attention.json"; }
step_model() { "${bench[@]}" --only model --json "$out/model.json" && echo "result: model.json"; }

step_engine() {
  python3 -m pytest tests/test_generation.py tests/test_recurrence.py -k "synchronises" -v -rfE -p no:cacheprovider \
    $(timeout_flag 25)
}

step_cuda() {
  if ! ls "$work/build/kernels"/_C_cuda*.so >/dev/null 2>&1; then
    echo "not built in time (or failed): see cuda-build.log"
    return 1
  fi
  cp "$work/build/kernels"/_C_cuda*.so kernels/
  python3 -m pytest tests/test_cuda_sources.py tests/test_lowrank_linear.py tests/test_circuit_attention.py \
    -k "cuda" -v -rfE -p no:cacheprovider $(timeout_flag 30)
}

timeout_flag() {  # pytest-timeout's per-test limit where it is installed
  if python3 -c "import pytest_timeout" 2>/dev/null; then echo "--timeout=$1"; fi
}

build_cuda() {  # in a copy, so that nothing here changes under the running steps
  mkdir -p "$work/build"
  cp -a setup.py setup.cfg README.md csrc kernels benchmarks recursive "$work/build/" && cd "$work/build" || return 1
  arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=4 nice -n 19 python3 setup.py build_ext --inplace
}

pack_logs() { tar -czf "$out/logs.tar.gz" -C "$work" logs 2>/dev/null; }

{
  echo "gpu_run.sh on $(hostname) at $(date -u +%FT%TZ), device $device, commit $(git rev-parse --short HEAD 2>/dev/null)"
  plan
} >"$out/summary.txt"
builder=
if ((!cpu)); then
  build_cuda >"$logs/cuda-build.log" 2>&1 &
  builder=$!
fi
for line in "${STEPS[@]}"; do
  IFS=: read -r name cap _ <<<"$line"
  if ((cpu)) && [[ $name == cuda ]]; then continue; fi
  start=$SECONDS
  timeout -k 5 "$cap" bash -c "$(declare -f step_"$name" timeout_flag); $(declare -p cpu out work bench); step_$name" \
    >"$logs/$name.log" 2>&1
  rc=$?
  # a step's result: its "result: " line, else pytest's or the sweep's last summary line
  result=$(grep -E "^result: " "$logs/$name.log" | tail -n 1 | cut -c9-)
  [[ -z $result ]] && result=$(grep -E "passed|failed|skipped|error|Error|^sweep: |not built" "$logs/$name.log" | tail -n 1)
  ((rc == 124 || rc == 137)) && result="cut at its cap; $result"
  printf '%-12s rc %-3s %4d s of %4d  %s\n' "$name" "$rc" $((SECONDS - start)) "$cap" "$result" | tee -a "$out/summary.txt"
  if [[ $name == env ]]; then cat "$logs/env.log" >>"$out/summary.txt"; fi
  pack_logs
done
if [[ -n $builder ]]; then kill "$builder" 2>/dev/null; fi
pack_logs
cat "$out/summary.txt"
