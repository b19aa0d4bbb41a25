#!/usr/bin/env bash
# `make demo`: the whole system on the shipped Fashion-MNIST subset, on the CPU, in about
# 10 minutes on 2 cores (after set-up). Every step is a `beit` command, printed before it runs:
#   1. the labelled images as ImageFolder trees: 8,000 train / 2,000 val, and 10% of the train labels
#   2. train a small dVAE tokenizer on the training images; draw its reconstructions
#   3. tokenize V views of every training image into a Zarr store (stage 1) and verify a sample
#   4. pre-train a tiny BEiT (4 layers, width 128) from the store, without labels (stage 2)
#   5. fine-tune it with 10% of the labels, and the same model from scratch with the same
#      labels and budget (the two at once, one core each); evaluate both on the 2,000
#      validation images
#   6. pictures: reconstructions, blockwise masks, pre-training curves, attention maps
# and prints one table. Output in runs/demo/ (or the folder given as the first argument).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=${1:-runs/demo}
size=${DEMO_SIZE:-28}               # image size; patches of 4 px
views=${DEMO_VIEWS:-4}
tokenizer_steps=${DEMO_TOKENIZER_STEPS:-400}
pretrain_epochs=${DEMO_PRETRAIN_EPOCHS:-7}
finetune_epochs=${DEMO_FINETUNE_EPOCHS:-30}
if [ -e "$out" ] && [ ! -f "$out/times.tsv" ]; then
  echo "demo: $out exists and is not an earlier demo's folder: name a new folder (bash scripts/demo.sh DIR)." >&2
  exit 2
fi
rm -rf "$out"  # an earlier demo's output
mkdir -p "$out/logs"
: >"$out/times.tsv"

# run NAME beit ARGS...: print the command, run it (progress on the terminal, output kept in
# logs/NAME.txt) and record its wall time
run() {
  local name=$1
  shift
  echo "+ $*"
  local start=$SECONDS
  "$py" -m "$@" | tee "$out/logs/$name.txt"
  printf '%s\t%s\n' "$name" $((SECONDS - start)) >>"$out/times.tsv"
}
# quietly NAME beit ARGS...: the same on one core, all output into logs/NAME.txt (for a job that
# runs beside another)
quietly() {
  local name=$1
  shift
  local start=$SECONDS
  OMP_NUM_THREADS=1 "$py" -m "$@" >"$out/logs/$name.txt" 2>&1
  printf '%s\t%s\n' "$name" $((SECONDS - start)) >>"$out/times.tsv"
}

model=(--model tiny --set model.image_size="$size" --set model.patch_size=4 --set model.width=128
       --set model.heads=4 --set model.depth=4)
# The same fine-tuning budget for both; layer-wise lr decay only where there is something to keep
# (from scratch it only slows the lower layers: 49.1% with it, 50.9% without, in a 20-epoch trial).
finetune=("${model[@]}" --epochs "$finetune_epochs" --batch-size 64 --lr 2e-3 --set warmup_epochs=3
          --set randaugment=false --set mixup=0 --set cutmix=0 --set erasing=0 --set model.drop_path=0.1
          --set eval_every="$finetune_epochs" --no-resume)

run data beit data fashion-mnist "$out/data" --size "$size"
run data-10pc beit data fashion-mnist "$out/data-10pc" --size "$size" --train 800 --seed 1
run tokenizer beit tokenizer train "$out/data/train" -o "$out/tokenizer.safetensors" --no-resume \
  --steps "$tokenizer_steps" --input-size "$size" --vocab-size 512 --batch-size 64 --set model.group_count=3 \
  --set model.n_hid=32 --set model.n_init=32 --set warmup_steps=100 --set held_out=0.05 --set min_crop_area=0.5
examples=$(ls "$out"/data/val/*/*.png | awk 'NR % 250 == 1' | head -8)
# shellcheck disable=SC2086
run reconstruct beit tokenizer reconstruct "$out/tokenizer.safetensors" $examples -o "$out/reconstructions.png"
run tokenize beit tokenize "$out/data/train" "$out/store" --tokenizer "$out/tokenizer.safetensors" \
  --views "$views" --set view.image_size="$size" --set patch_size=4 --set view.scale=[0.5,1.0] --batch-size 64 \
  --set chunk_images=500
run verify beit store verify "$out/store" --sample 32
run pretrain beit pretrain "$out/store" --out "$out/pretrain" --no-resume "${model[@]}" --epochs "$pretrain_epochs" \
  --batch-size 64 --lr 3e-3 --warmup-epochs 1 --set log_every=25 --set model.drop_path=0.0
# The two fine-tunings at once, one core each (a tiny ViT uses two cores poorly; the results are
# the same as one after the other).
echo "+ beit finetune $out/data-10pc --init $out/pretrain/checkpoint.pt --out $out/finetune-beit --layer-decay 0.75 ..."
echo "+ beit finetune $out/data-10pc --init none --out $out/finetune-scratch --layer-decay 1.0 ...  (both at once)"
quietly finetune-beit beit finetune "$out/data-10pc" --init "$out/pretrain/checkpoint.pt" \
  --out "$out/finetune-beit" --layer-decay 0.75 "${finetune[@]}" --set threads=1 &
beit_job=$!
quietly finetune-scratch beit finetune "$out/data-10pc" --init none --out "$out/finetune-scratch" \
  --layer-decay 1.0 "${finetune[@]}" --set threads=1 &
scratch_job=$!
for job in "$beit_job:beit" "$scratch_job:scratch"; do
  wait "${job%%:*}" || { echo "fine-tuning failed: see $out/logs/finetune-${job#*:}.txt" >&2; exit 1; }
  tail -1 "$out/logs/finetune-${job#*:}.txt"
done
run evaluate-beit beit evaluate "$out/finetune-beit/checkpoint.pt" "$out/data/val"
run evaluate-scratch beit evaluate "$out/finetune-scratch/checkpoint.pt" "$out/data/val"
grid=$((size / 4))
first=$(echo "$examples" | head -1)
run curves beit plot "$out/pretrain" -o "$out/pretrain-curves.png"
run masks beit mask "$first" -o "$out/masks.png" --grid "$grid" --count $(((grid * grid * 75 + 98) / 196))
# shellcheck disable=SC2086
run attention beit attention "$out/pretrain/checkpoint.pt" $(echo "$examples" | head -4) -o "$out/attention.png"

"$py" - "$out" "$views" "$SECONDS" <<'PY'
import json, re, sys
from pathlib import Path

out, views, total = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
times = dict(line.split("\t") for line in (out / "times.tsv").read_text().splitlines())
seconds = lambda *names: sum(int(times[n]) for n in names)  # noqa: E731
tokenizer = json.loads((out / "tokenizer.json").read_text())
report, vocab = tokenizer["report"]["held_out"], tokenizer["vocab_size"]
pretrain = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()][-1]
stage1 = json.loads((out / "store.metrics.json").read_text())
verify = re.search(r"([\d.]+)% of tokens", (out / "logs" / "verify.txt").read_text())


def top1(name):
    text = (out / "logs" / f"evaluate-{name}.txt").read_text()
    return float(re.search(r"top-1 ([\d.]+)%", text).group(1))


beit, scratch = top1("beit"), top1("scratch")
rows = [
    ("tokenizer (dVAE)", f"held-out PSNR {report['psnr']:.1f} dB (mean colour {report['baseline_psnr']:.1f} dB), "
     f"{report['codes_used']}/{vocab} codes used", seconds("tokenizer")),
    (f"tokenize ({views} views per image)", f"{stage1['views_per_s']:.0f} views/s; a sample re-tokenized: {verify.group(1)}% identical", seconds("tokenize", "verify")),
    ("pre-training (no labels)", f"masked-token accuracy {pretrain['mim_accuracy'] * 100:.1f}% "
     f"(chance {100 / vocab:.1f}%), loss {pretrain['loss']:.2f}", seconds("pretrain")),
    ("fine-tune from BEiT, 10% labels", f"top-1 {beit:.1f}%", seconds("finetune-beit", "evaluate-beit")),
    # (the two fine-tunings ran at the same time, one core each)
    ("fine-tune from scratch, 10% labels", f"top-1 {scratch:.1f}%", seconds("finetune-scratch", "evaluate-scratch")),
]
width = max(len(r[0]) for r in rows)
print(f"\nBEiT demo on Fashion-MNIST ({out})\n")
print(f"{'stage':<{width}}  {'result':<70}  time")
for name, result, t in rows:
    print(f"{name:<{width}}  {result:<70}  {t:>3d} s")
print(f"\nBEiT pre-training adds {beit - scratch:+.1f} points of top-1 over scratch with the same labels and budget.")
print(f"total {total} s (the two fine-tunings ran at once); pictures in {out}: " + ", ".join(
    p.name for p in sorted(out.glob("*.png"))))
PY
