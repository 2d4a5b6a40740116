#!/usr/bin/env bash
# The checks a session runs when it is lent a GPU (about 2 minutes on one H200), each one's output in OUT/:
#   the CUDA tests (model vs transformers on the GPU; SFT step, distillation step and decoding vs the CPU),
#   bf16 training throughput vs transformers at SmolLM2-135M's shape and the paper's batch 8 x 512, plain and with
#   our layers compiled and fused AdamW, throughput and peak memory of the paper's student (Llama-3.2-3B shape,
#   random weights) on one GPU beside bench/memory_plan.py's estimate for it, and the whole pipeline end to end on
#   the GPU (experiment.py --quick). No model file is needed but the tokenizer (models/teacher, as prepare.py
#   leaves it) for the quick run. Exits non-zero if any step failed.
#
#     bash bench/gpu_check.sh OUT [DATA_DIR]        # DATA_DIR: --data-dir for the quick run (default ../shared/data)
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT [DATA_DIR]}
data=()
[ -n "${2:-}" ] && data=(--data-dir "$2")
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=()
step() {  # step NAME FILE COMMAND...: run it, its output to the terminal and OUT/FILE
  local name=$1 file=$2
  shift 2
  "$@" 2>&1 | tee "$out/$file" || failed+=("$name")
}
gpu_info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv &&
    $py -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
            'transformers', transformers.__version__)"
}
throughput() {
  timeout 120 $py bench/train_throughput.py --device cuda --batch-size 8 --seq-len 512 --precision bf16 \
      --steps 10 --warmup 3 "$@"
}
student_3b() {
  timeout 150 $py bench/scale.py --shape llama-3.2-3b --device cuda --batch 8 --seq 512 --answer-tokens 16 &&
    $py bench/memory_plan.py --job student-sft --ranks 1 --gpu-gib 140 --answer-tokens 16
}
quick() {
  rm -rf /tmp/gpu_check_quick
  timeout 240 $py experiment.py --quick --device cuda --out /tmp/gpu_check_quick "${data[@]}" >/tmp/gpu_check_quick.log &&
    cp /tmp/gpu_check_quick/*/results.md "$out/quick_results.md"
  local rc=$?
  tail -60 /tmp/gpu_check_quick.log
  return $rc
}
step "gpu" gpu.txt gpu_info
step "tests/test_cuda.py" test_cuda.txt timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py
step "throughput" train_throughput.txt throughput
step "throughput, compiled" train_throughput_compile.txt throughput --compile --fused-adamw
step "3B student" scale_3b.txt student_3b
step "quick experiment" quick.txt quick
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: failed: ${failed[*]}" >&2
  exit 1
fi
echo "gpu_check: every step passed -> $out"
