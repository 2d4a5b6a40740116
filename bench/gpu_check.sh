#!/usr/bin/env bash
# The checks a session runs when it is lent a GPU (about 6 minutes on one H200), each one's output in OUT/:
#   the CUDA tests (model vs transformers on the GPU; SFT step, distillation step and decoding vs the CPU),
#   bf16 training throughput vs transformers at SmolLM2-135M's shape and the paper's batch 8 x 512,
#   throughput and peak memory of the paper's student (Llama-3.2-3B shape, random weights) on one GPU, beside
#   bench/memory_plan.py's estimate for it, and the whole pipeline end to end on the GPU (experiment.py --quick).
# No model file is needed but the tokenizer (models/teacher, as prepare.py leaves it) for the quick run.
#
#     bash bench/gpu_check.sh OUT [DATA_DIR]        # DATA_DIR: --data-dir for the quick run (default ../shared/data)
set -u
out=${1:?usage: bash bench/gpu_check.sh OUT [DATA_DIR]}
data=${2:+--data-dir $2}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
          'transformers', transformers.__version__)"; } 2>&1 | tee "$out/gpu.txt"
timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.txt"
timeout 120 $py bench/train_throughput.py --device cuda --batch-size 8 --seq-len 512 --precision bf16 \
    --steps 10 --warmup 3 2>&1 | tee "$out/train_throughput.txt"
{ timeout 150 $py bench/scale.py --shape llama-3.2-3b --device cuda --batch 8 --seq 512 --answer-tokens 16
  $py bench/memory_plan.py --job student-sft --ranks 1 --gpu-gib 141 --answer-tokens 16; } 2>&1 \
    | tee "$out/scale_3b.txt"
rm -rf /tmp/gpu_check_quick
timeout 240 $py experiment.py --quick --device cuda --out /tmp/gpu_check_quick $data 2>&1 | tail -60 \
    | tee "$out/quick.txt"
cp /tmp/gpu_check_quick/*/results.md "$out/quick_results.md" 2>/dev/null
