#!/usr/bin/env bash
# BEiT pre-training + fine-tuning vs the same fine-tuning from scratch, with 10% of the labels,
# on the shipped Fashion-MNIST subset, on the CPU (about 25 minutes on 2 cores).
#   bash bench/quality/quick.sh [WORKDIR]     (default runs/quality-quick)
# Steps: a small dVAE on the 8,000 training images (32 px, 8x8 tokens); 4 views each tokenized;
# a 4-layer width-128 BEiT pre-trained on all 8,000 (no labels); then the same fine-tuning
# budget on 800 labelled images (10%), from the pre-trained weights and from scratch, evaluated
# on the 2,000 validation images.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-.venv/bin/python}
w=${1:-runs/quality-quick}
mkdir -p "$w"
start=$(date +%s)
"$py" -m beit data fashion-mnist "$w/all" --size 32 >/dev/null
"$py" -m beit data fashion-mnist "$w/ten" --size 32 --train 800 --seed 1 >/dev/null
model=(--model tiny --set model.image_size=32 --set model.patch_size=4 --set model.width=128 --set model.heads=4
       --set model.depth=4)
"$py" -m beit tokenizer train "$w/all/train" -o "$w/tokenizer.safetensors" --steps 600 --input-size 32 \
  --vocab-size 512 --batch-size 64 --set group_count=3 --set n_hid=32 --set n_init=32 --set warmup_steps=50 \
  --set held_out=0.05 --set min_crop_area=0.5 2>/dev/null | tail -1
t1=$(date +%s)
"$py" -m beit tokenize "$w/all/train" "$w/store" --tokenizer "$w/tokenizer.safetensors" --views 4 \
  --set view.image_size=32 --set patch_size=4 --set view.scale=[0.5,1.0] --batch-size 64 --set chunk_images=512 \
  2>/dev/null | tail -1
t2=$(date +%s)
"$py" -m beit pretrain "$w/store" --out "$w/pretrain" "${model[@]}" --epochs 12 --batch-size 64 --lr 1.5e-3 \
  --warmup-epochs 1 --set log_every=50 --set model.drop_path=0.0 2>/dev/null | tail -1
t3=$(date +%s)
for init in "$w/pretrain/checkpoint.pt" none; do
  name=$([ "$init" = none ] && echo scratch || echo beit)
  "$py" -m beit finetune "$w/ten" --init "$init" --out "$w/ft-$name" "${model[@]}" --epochs 30 --batch-size 64 \
    --lr 2e-3 --layer-decay 0.75 --set warmup_epochs=3 --set randaugment=false --set mixup=0 --set cutmix=0 \
    --set erasing=0 --set model.drop_path=0.1 --no-resume 2>/dev/null | tail -1
done
t4=$(date +%s)
"$py" - "$w" <<'PY'
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
def best(run):
    rows = [json.loads(l) for l in (w / run / "metrics.jsonl").read_text().splitlines() if "eval_top1" in l]
    return max(r["eval_top1"] for r in rows) * 100, rows[-1]["eval_top1"] * 100
pt = [json.loads(l) for l in (w / "pretrain" / "metrics.jsonl").read_text().splitlines()][-1]
tok = json.loads((w / "tokenizer.json").read_text())["report"]["held_out"]
print(f"tokenizer: held-out PSNR {tok['psnr']:.1f} dB (mean colour {tok['baseline_psnr']:.1f}), codes used {tok['codes_used']}/512")
print(f"pre-training: final loss {pt['loss']:.3f}, masked-token accuracy {pt['mim_accuracy'] * 100:.1f}%")
for run in ("ft-beit", "ft-scratch"):
    b, last = best(run)
    print(f"{run:<11} 10% labels: top-1 best {b:.1f}%, last {last:.1f}%")
PY
echo "times (s): tokenizer $((t1 - start)), tokenize $((t2 - t1)), pretrain $((t3 - t2)), two fine-tunings $((t4 - t3))"
