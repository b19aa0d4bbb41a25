#!/usr/bin/env bash
# Do the differences grow with longer pre-training? The CPU size of `bench/quality/quality.py` again, its
# store (10,000 images x 10 views) and its fine-tuning, with 4x the pre-training: 24 epochs
# (3,744 steps) instead of 6, for visual-token targets from the cached views, pixel regression,
# and online tokenization (at 24 epochs each cached view repeats 2.4 times, while online targets
# come from a fresh view every time). Then the same 300-step fine-tuning on the 1,000 labels.
# Run after `python bench/quality/quality.py --size cpu` (it reuses that run's tokenizer, store and labels).
#   bash bench/quality/longer.sh [WORK]     (default runs/quality-longer; about an hour on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-.venv/bin/python}
w=${1:-runs/quality-longer}
q=${QUALITY:-runs/quality-cpu}
mkdir -p "$w"
source bench/quality/common.sh  # the working folder is the repository root
# three runs at a time, one thread each
pretrain() {
  OMP_NUM_THREADS=1 "$py" -m beit pretrain "$q/store" --out "$w/pretrain-$1" "${model[@]}" --epochs 24 \
    --batch-size 64 --lr 3e-3 --warmup-epochs 2 --set log_every=50 --set model.drop_path=0.0 --set threads=1 \
    "${@:2}" 2>/dev/null | tail -1
}
pretrain tokens & pretrain pixels --targets pixels & pretrain online --targets online & wait
finetune tokens & finetune pixels & finetune online & wait
for run in tokens pixels online; do
  "$py" - "$w" "$run" <<'PY'
import json, sys
from pathlib import Path
w, run = Path(sys.argv[1]), sys.argv[2]
rows = [json.loads(l) for l in (w / f"pretrain-{run}" / "metrics.jsonl").read_text().splitlines()]
ft = [json.loads(l) for l in (w / f"ft-{run}" / "metrics.jsonl").read_text().splitlines() if "eval_top1" in l][-1]
acc = rows[-1].get("mim_accuracy")
acc = f"{acc * 100:.1f}%" if acc is not None else "-"
speed = sorted(r["images_per_s"] for r in rows)[len(rows) // 2]
print(f"{run}: {rows[-1]['step']} steps, masked-token accuracy {acc}, {speed:.0f} img/s (median), "
      f"10% labels top-1 {ft['eval_top1'] * 100:.1f}%")
PY
done
