#!/usr/bin/env bash
# One check of lmlab's CUDA paths on a GPU machine, at most ~8 minutes, one table.
# Never run in CI (no test calls it); it stops at once without a CUDA device.
#   benchmarks/gpu_check.sh [OUT.md]      # default: benchmarks/results/gpu_check_<date>.md
# 1. bf16 training of `small` and `medium`: tokens/s, MFU against a measured bf16 peak,
#    peak memory; greedy decoding against Hugging Face (benchmarks/gpu_check.py)
# 2. tests/test_gpu.py: the fused loss and decoding on CUDA, FSDP (trainer=fsdp) on one GPU
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu_check_$(date +%F).md}
python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "error: gpu_check.sh needs a CUDA device")'
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
timeout 300 python benchmarks/gpu_check.py --out "$out"
if timeout 180 python -m pytest tests/test_gpu.py -q -p no:cacheprovider > "$out.tests" 2>&1; then
    status=passed
else
    status="FAILED (see $out.tests)"
fi
echo "| tests/test_gpu.py (fused loss, decoding, FSDP on one GPU) | $status | | |" >> "$out"
cat "$out"
