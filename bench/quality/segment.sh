#!/usr/bin/env bash
# Issue 14's evidence, on the CPU: does this project's BEiT pre-training help semantic
# segmentation with few labelled scenes, against the same model from scratch and against
# pixel-regression pre-training (the paper's Table 4 comparison, 44.65 vs 41.38 mIoU on ADE20K)?
#
#   bash bench/quality/segment.sh OUT [PRETRAINED]
#
#   1. pre-training exactly as scripts/demo.sh does it (Fashion-MNIST at 28 px, a dVAE of 400 steps,
#      4 views per image, a tiny BEiT of 4 layers, width 128, 4 heads, patch 4, 7 epochs), and a
#      second one at the same settings and budget with `--targets pixels`; the two at once, one
#      core each. PRETRAINED: a folder that has them already (an earlier run of this script, or a
#      demo's folder: its tokenizer.safetensors, store/ and pretrain/ are used, and
#      pretrain-pixels/ too if it is there, else that one is trained here from its store)
#   2. `beit data fashion-scenes` with few labelled scenes (SEG_TRAIN, 200) and SEG_VAL (200)
#      validation scenes
#   3. per seed, three `beit segment train` runs with the same budget and settings, at once on one
#      core each: --init the BEiT checkpoint, the pixel-regression checkpoint, and none. UperNet on
#      the pre-trained ViT (crop 64; the scenes, 64-112 px, at base scale [112, 64]); one
#      evaluation at the end, by sliding window on the validation scenes
#   4. one table (init, seed, mIoU, mAcc, aAcc, loss first -> last, minutes) and OUT/results.json
#
# Settings (environment): PYTHON, SEG_TRAIN, SEG_VAL, SEG_ITERS (2000), SEG_BATCH (8), SEG_LR (3e-3),
# SEG_SEEDS ("0 1 2"). Wall time on 2 cores: about 11 minutes of pre-training (none with
# PRETRAINED) and about 17 minutes per seed (the three runs at about 16 images/s each; the
# patch-4 neck keeps UperNet's finest map at the ViT's grid). At 300 iterations (SEG_ITERS=300)
# no init gets past calling every pixel background.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-.venv/bin/python}
out=${1:?usage: bash bench/quality/segment.sh OUT [PRETRAINED]}
pretrained=${2:-}
scenes_train=${SEG_TRAIN:-200}
scenes_val=${SEG_VAL:-200}
iters=${SEG_ITERS:-2000}
batch=${SEG_BATCH:-8}
lr=${SEG_LR:-3e-3}
seeds=${SEG_SEEDS:-0 1 2}
size=28
if [ -e "$out" ] && [ ! -f "$out/times.tsv" ]; then
  echo "segment_quality: $out exists and is not an earlier run's folder: name a new folder." >&2
  exit 2
fi
rm -rf "$out"
mkdir -p "$out/logs"
: >"$out/times.tsv"
out=$(cd "$out" && pwd)
start_all=$SECONDS

# run NAME beit ARGS...: print the command, run it (output in logs/NAME.txt), record its wall time
run() {
  local name=$1
  shift
  echo "+ $*"
  local start=$SECONDS
  "$py" -m "$@" >"$out/logs/$name.txt" 2>&1 || { echo "$name failed: see $out/logs/$name.txt" >&2; exit 1; }
  printf '%s\t%s\n' "$name" $((SECONDS - start)) >>"$out/times.tsv"
}
# beside NAME beit ARGS...: the same on one core, in the background (wait for it with `finish`)
jobs_started=()
beside() {
  local name=$1
  shift
  echo "+ $*  &"
  (
    start=$SECONDS
    OMP_NUM_THREADS=1 "$py" -m "$@" >"$out/logs/$name.txt" 2>&1
    printf '%s\t%s\n' "$name" $((SECONDS - start)) >>"$out/times.tsv"
  ) &
  jobs_started+=("$!:$name")
}
finish() {
  local job
  for job in "${jobs_started[@]}"; do
    wait "${job%%:*}" || { echo "${job#*:} failed: see $out/logs/${job#*:}.txt" >&2; exit 1; }
  done
  jobs_started=()
}

# 1. pre-training: the demo's model and settings, token targets and pixel targets
model=(--model tiny --set model.image_size="$size" --set model.patch_size=4 --set model.width=128
       --set model.heads=4 --set model.depth=4)
pretrain=(--no-resume "${model[@]}" --epochs 7 --batch-size 64 --lr 3e-3 --warmup-epochs 1 --set log_every=25
          --set model.drop_path=0.0 --set threads=1)
if [ -n "$pretrained" ]; then
  pretrained=$(cd "$pretrained" && pwd)
  for need in tokenizer.safetensors store pretrain/checkpoint.pt; do
    [ -e "$pretrained/$need" ] || { echo "segment_quality: $pretrained has no $need." >&2; exit 2; }
  done
  echo "reusing the pre-training in $pretrained"
  ln -s "$pretrained/store" "$out/store"
  ln -s "$pretrained/pretrain" "$out/pretrain"
  if [ -f "$pretrained/pretrain-pixels/checkpoint.pt" ]; then
    ln -s "$pretrained/pretrain-pixels" "$out/pretrain-pixels"
  else
    run pretrain-pixels beit pretrain "$out/store" --out "$out/pretrain-pixels" --targets pixels "${pretrain[@]}"
  fi
else
  run data beit data fashion-mnist "$out/data" --size "$size"
  run tokenizer beit tokenizer train "$out/data/train" -o "$out/tokenizer.safetensors" --no-resume \
    --steps 400 --input-size "$size" --vocab-size 512 --batch-size 64 --set model.group_count=3 \
    --set model.n_hid=32 --set model.n_init=32 --set warmup_steps=100 --set held_out=0.05 --set min_crop_area=0.5
  run tokenize beit tokenize "$out/data/train" "$out/store" --tokenizer "$out/tokenizer.safetensors" \
    --views 4 --set view.image_size="$size" --set patch_size=4 --set view.scale=[0.5,1.0] --batch-size 64 \
    --set chunk_images=500
  # the two at once, one core each (a tiny ViT uses two cores poorly)
  beside pretrain beit pretrain "$out/store" --out "$out/pretrain" "${pretrain[@]}"
  beside pretrain-pixels beit pretrain "$out/store" --out "$out/pretrain-pixels" --targets pixels "${pretrain[@]}"
  finish
fi

# 2. few labelled scenes
run scenes beit data fashion-scenes "$out/scenes" --train "$scenes_train" --val "$scenes_val" --seed 0

# 3. the same segmentation budget from each init. UperNet's channels are 32 (at the model's width,
# 128, UperNet would count about 0.2 GMAC an image, three quarters of the ViT's); the pre-trained
# ViTs get the recipe's layer decay, the one from scratch none (as in the demo: decay only slows
# the lower layers of a random ViT).
segment=(--model tiny --crop 64 --set model.patch_size=4 --set model.width=128 --set model.heads=4
         --set model.depth=4 --set "scale=[112,64]" --iters "$iters" --batch-size "$batch" --lr "$lr"
         --set warmup_iters=$((iters / 10)) --set channels=32 --set aux_channels=32 --set log_every=10
         --set eval_every="$iters" --set checkpoint_every="$iters" --set threads=1 --no-resume)
for seed in $seeds; do
  beside "segment-beit-s$seed" beit segment train "$out/scenes" --init "$out/pretrain/checkpoint.pt" \
    --out "$out/segment-beit-s$seed" --layer-decay 0.65 "${segment[@]}" --set seed="$seed"
  beside "segment-pixels-s$seed" beit segment train "$out/scenes" --init "$out/pretrain-pixels/checkpoint.pt" \
    --out "$out/segment-pixels-s$seed" --layer-decay 0.65 "${segment[@]}" --set seed="$seed"
  beside "segment-scratch-s$seed" beit segment train "$out/scenes" --init none \
    --out "$out/segment-scratch-s$seed" --layer-decay 1.0 "${segment[@]}" --set seed="$seed"
  finish
  for init in beit pixels scratch; do tail -1 "$out/logs/segment-$init-s$seed.txt"; done
done

# 4. the table
"$py" - "$out" "$((SECONDS - start_all))" "$seeds" <<'PY'
import json, statistics, sys
from pathlib import Path

import numpy as np
from PIL import Image

out, total, seeds = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split()
times = dict(line.split("\t") for line in (out / "times.tsv").read_text().splitlines())
# the floor: every pixel called background
labels = np.concatenate([np.asarray(Image.open(p)).ravel() for p in sorted((out / "scenes/annotations/validation").glob("*.png"))])
labels = labels[labels != 255]
background = float((labels == 0).mean())
classes = len(json.loads((out / "scenes/classes.json").read_text())["classes"])
present = len(np.unique(labels))
floor = {"mIoU": background / present, "aAcc": background, "mAcc": 1 / present}

names = {"beit": "BEiT (token targets)", "pixels": "pixel regression", "scratch": "from scratch"}
runs = []
for seed in seeds:
    for init in names:
        rows = [json.loads(line) for line in (out / f"segment-{init}-s{seed}" / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        last = [r for r in rows if "eval_mIoU" in r][-1]
        runs.append({"init": init, "seed": int(seed), "mIoU": 100 * last["eval_mIoU"], "mAcc": 100 * last["eval_mAcc"],
                     "aAcc": 100 * last["eval_aAcc"], "loss_first": losses[0], "loss_last": losses[-1],
                     "minutes": int(times[f"segment-{init}-s{seed}"]) / 60})
pretrain = {}
for name in ("pretrain", "pretrain-pixels"):
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    pretrain[name] = {k: v for k, v in rows[-1].items() if isinstance(v, (int, float))}
summary = {}
for init in names:
    values = [r["mIoU"] for r in runs if r["init"] == init]
    summary[init] = {"mean_mIoU": statistics.mean(values), "min": min(values), "max": max(values)}
    if len(values) > 1:
        summary[init]["stdev"] = statistics.stdev(values)
result = {"runs": runs, "summary": summary, "background_only": floor, "classes": classes,
          "pretrain_last_log": pretrain, "total_seconds": total}
(out / "results.json").write_text(json.dumps(result, indent=2) + "\n")

print(f"\nSegmentation on fashion-scenes ({out}): UperNet, the same budget from each init\n")
print(f"{'init':<22} {'seed':>4} {'mIoU':>6} {'mAcc':>6} {'aAcc':>6}  {'loss first -> last':<18} {'min':>5}")
for r in runs:
    loss = f"{r['loss_first']:.2f} -> {r['loss_last']:.2f}"
    print(f"{names[r['init']]:<22} {r['seed']:>4} {r['mIoU']:6.1f} {r['mAcc']:6.1f} {r['aAcc']:6.1f}  {loss:<18} {r['minutes']:5.1f}")
print()
for init, s in summary.items():
    spread = f" (min {s['min']:.1f}, max {s['max']:.1f}, sd {s['stdev']:.1f})" if "stdev" in s else ""
    print(f"{names[init]:<22} mean mIoU {s['mean_mIoU']:.1f} over {len(seeds)} seed(s){spread}")
print(f"every pixel called background: mIoU {100 * floor['mIoU']:.1f}, aAcc {100 * floor['aAcc']:.1f} "
      f"({present} classes in the validation labels)")
print(f"total {total} s (the three runs of a seed at once, one core each); results in {out}/results.json")
PY
