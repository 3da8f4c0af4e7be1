#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a CUDA GPU: the CUDA tests (tests/test_cuda.py), then speed and GPU
# memory of random-weight models with Qwen2.5-0.5B's and -7B's shapes, ours against transformers on the same GPU
# (bfloat16), ours int4 (round-to-nearest, tinygemm) and --load-in (bitsandbytes). Logs go under ${OUT:-cuda-out}.
#   bash benchmarks/cuda_check.sh [0.5b 7b ...]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-cuda-out}
work=${WORK:-/tmp/qwen2cli-cuda-check}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 QWEN2_HOME="$work/home"
step() { echo "== $(date +%T) $*" | tee -a "$out/steps.log"; }
step gpu
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
step tests
timeout 360 python3 -m pytest -o addopts="" -q -rs -p no:cacheprovider tests/test_cuda.py > "$out/tests.log" 2>&1
echo "tests exit $?" | tee -a "$out/steps.log"
tail -5 "$out/tests.log"
for size in "${@:-0.5b 7b}"; do
  for s in $size; do
    step "$s: checkpoint"
    timeout 180 python3 benchmarks/shaped_checkpoint.py "$s" "$work/$s" --device cuda > /dev/null 2>> "$out/bench-$s.err" || continue
    step "$s: bfloat16, ours vs transformers"
    timeout 240 python3 benchmarks/vs_transformers.py --model "$work/$s" --device cuda --dtype bfloat16 --repeats 1 \
      2>> "$out/bench-$s.err" | tee -a "$out/bench-$s.txt"
    step "$s: int4 rtn quantize on the GPU"
    timeout 240 python3 -m qwen2cli quantize "$work/$s" --method rtn --bits 4 --device cuda --out "$work/$s-int4" \
      > /dev/null 2>> "$out/bench-$s.err" && \
    timeout 120 python3 -m qwen2cli bench "$work/$s-int4" --device cuda --json 2>> "$out/bench-$s.err" \
      | tee -a "$out/bench-$s.txt"
    for load_in in 8bit 4bit; do
      step "$s: --load-in $load_in"
      timeout 120 python3 -m qwen2cli bench "$work/$s" --device cuda --load-in "$load_in" --json \
        2>> "$out/bench-$s.err" | tee -a "$out/bench-$s.txt"
    done
  done
done
step done
