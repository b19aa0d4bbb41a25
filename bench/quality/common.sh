# Shared by bench/quality/views.sh and bench/quality/longer.sh (sourced; they set py, w and q):
# the CPU size's model (bench/quality/quality.py) and its 10%-label fine-tuning, one thread per run.
model=(--model tiny --set model.image_size=28 --set model.patch_size=4 --set model.width=128 --set model.heads=4
       --set model.depth=4)
# finetune NAME: fine-tune $w/pretrain-NAME on $q/labels-1000 into $w/ft-NAME (300 steps), print its last line
finetune() {
  OMP_NUM_THREADS=1 "$py" -m beit finetune "$q/labels-1000" --init "$w/pretrain-$1/checkpoint.pt" --out "$w/ft-$1" \
    "${model[@]}" --epochs 20 --batch-size 64 --lr 0.002 --layer-decay 0.75 --set warmup_epochs=2 \
    --set randaugment=false --set mixup=0 --set cutmix=0 --set erasing=0 --set model.drop_path=0.1 \
    --set eval_every=20 --set threads=1 2>/dev/null | tail -1
}
