#!/usr/bin/env bash
# Does the number of cached views V matter once each view repeats many times? Many epochs over
# few images: 2,000 Fashion-MNIST training images, 30 epochs of pre-training (930 steps, the
# budget of `bench/quality/quality.py --size cpu`), all 10 cached views (each seen 3 times) against the
# first one only (seen 30 times); then the same fine-tuning on the 1,000 labelled images.
# Run after `python bench/quality/quality.py --size cpu` (it reuses that run's tokenizer and labels).
#   bash bench/quality/views.sh [WORK]     (default runs/quality-views; about 10 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-.venv/bin/python}
w=${1:-runs/quality-views}
q=${QUALITY:-runs/quality-cpu}
source=${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
mkdir -p "$w"
"$py" -m beit data fashion-mnist "$w/data" --size 28 --source "$source" --train 2000 --val 10 >/dev/null
"$py" -m beit tokenize "$w/data/train" "$w/store" --tokenizer "$q/tokenizer.safetensors" --views 10 \
  --set view.image_size=28 --set patch_size=4 --set view.scale=[0.5,1.0] --batch-size 64 \
  --set chunk_images=500 2>/dev/null | tail -1
source bench/quality/common.sh  # the working folder is the repository root
# two runs at a time, one core each
pretrain() {
  OMP_NUM_THREADS=1 "$py" -m beit pretrain "$w/store" --out "$w/pretrain-$1" "${model[@]}" --epochs 30 \
    --batch-size 64 --lr 3e-3 --warmup-epochs 3 --set log_every=50 --set model.drop_path=0.0 --set threads=1 \
    "${@:2}" 2>/dev/null | tail -1
}
pretrain v10 & pretrain v1 --set views=1 & wait
finetune v10 & finetune v1 & wait
for v in v10 v1; do
  "$py" - "$w" "$v" <<'PY'
import json, sys
from pathlib import Path
w, v = Path(sys.argv[1]), sys.argv[2]
pt = [json.loads(l) for l in (w / f"pretrain-{v}" / "metrics.jsonl").read_text().splitlines()][-1]
ft = [json.loads(l) for l in (w / f"ft-{v}" / "metrics.jsonl").read_text().splitlines() if "eval_top1" in l][-1]
print(f"{v}: masked-token accuracy {pt['mim_accuracy'] * 100:.1f}%, 10% labels top-1 {ft['eval_top1'] * 100:.1f}%")
PY
done
