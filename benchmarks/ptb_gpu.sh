#!/usr/bin/env bash
# experiment=ptb_gpu on one GPU: train for 55 minutes, tune the neural cache and dynamic
# evaluation on the validation split, then score the test split once with the best of each:
# static, cache, dynamic evaluation, and both (one eval.py run reports all four, in
# RUN_DIR/checkpoints/best.eval_test.json). Not yet run on a GPU: lmlab quotes no figure.
#
#   benchmarks/ptb_gpu.sh PATH_TO_PTB [RUN_DIR] [train.py overrides ...]
#
# The grids (Hydra sweep values) can be replaced: CACHE_THETA, CACHE_LAMBDA, CACHE_SIZE,
# DYNAMIC_LR, DYNAMIC_DECAY; DEVICE (cuda) is eval.py's device; DATA_OVERRIDES, data
# overrides for both train.py and eval.py (another corpus: "data=text data.files.train=...").
set -euo pipefail
ptb=${1:?usage: benchmarks/ptb_gpu.sh PATH_TO_PTB [RUN_DIR] [train.py overrides ...]}
run=${2:-logs/ptb_gpu/$(date -u +%Y-%m-%d_%H-%M-%S)}
shift $(($# < 2 ? $# : 2))
device=${DEVICE:-cuda}
accelerator=$([ "$device" = cpu ] && echo cpu || echo gpu)
read -r -a data <<<"${DATA_OVERRIDES:-}"

python train.py experiment=ptb_gpu data.data_dir="$ptb" "${data[@]}" \
  trainer.accelerator="$accelerator" hydra.run.dir="$run" "$@"

ckpt=$run/checkpoints/best.ckpt
# the validation's own reading (eval_batch_size 10 streams); the cache and dynamic
# evaluation read each split as one stream
common=(ckpt="$ckpt" data.data_dir="$ptb" "${data[@]}" device="$device" bleu.num_sentences=0
  order=contiguous batch_size=10)
python eval.py -m "${common[@]}" split=valid cache.enabled=true \
  cache.size="${CACHE_SIZE:-500,2000}" cache.theta="${CACHE_THETA:-0.3,0.6,1.0}" \
  cache.lambda="${CACHE_LAMBDA:-0.05,0.1,0.2}" hydra.sweep.dir="$run/tune_cache"
python eval.py -m "${common[@]}" split=valid dynamic_eval.enabled=true \
  dynamic_eval.lr="${DYNAMIC_LR:-1e-5,3e-5,5e-5}" \
  dynamic_eval.decay="${DYNAMIC_DECAY:-1e-3,2e-3}" hydra.sweep.dir="$run/tune_dynamic"

# The overrides of the job with the lowest validation perplexity of `key` in each sweep.
best() {
  python - "$1" "$2" <<'PY'
import json, sys
from pathlib import Path

reports = [json.loads(p.read_text()) for p in Path(sys.argv[1]).glob("*/eval_valid.json")]
key = sys.argv[2]
chosen = min(reports, key=lambda r: r[key]["ppl"])[key]
names = {"cache": ("size", "theta", "lambda"), "dynamic_eval": ("lr", "decay")}[key]
print(" ".join(f"{key}.{name}={chosen[name]}" for name in names))
PY
}
read -r -a cache <<<"$(best "$run/tune_cache" cache)"
read -r -a dynamic <<<"$(best "$run/tune_dynamic" dynamic_eval)"
echo "tuned on valid: ${cache[*]} ${dynamic[*]}"
python eval.py "${common[@]}" split=test cache.enabled=true "${cache[@]}" \
  dynamic_eval.enabled=true "${dynamic[@]}"
