#!/usr/bin/env bash
# The demo, until the Fashion-MNIST demo lands: on 16 real photos (the ones scikit-image ships),
# train a small dVAE tokenizer and picture its reconstructions, tokenize 8 views per photo into
# a store and verify it, pre-train a tiny BEiT from the store and draw its curves, and time the
# pre-training step beside Hugging Face's. About 3-4 minutes on 2 CPU cores. Output in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=runs/demo
mkdir -p "$out/photos"
"$py" - "$out/photos" <<'PY'
import importlib.util, sys
from pathlib import Path
from PIL import Image
data = Path(next(iter(importlib.util.find_spec("skimage").submodule_search_locations))) / "data"
names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
         "retina.jpg", "ihc.png", "motorcycle_right.png", "camera.png", "brick.png", "grass.png", "gravel.png",
         "moon.png", "coins.png", "page.png"]
for name in names:
    image = Image.open(data / name).convert("RGB")
    scale = 160 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    image.save(Path(sys.argv[1]) / f"{Path(name).stem}.jpg", quality=90)
print(f"demo: {len(names)} photos from scikit-image (skimage/data) in {sys.argv[1]}")
PY
"$py" -m beit tokenizer train "$out/photos" -o "$out/tokenizer.safetensors" --no-resume --steps 300 \
  --input-size 32 --vocab-size 256 --batch-size 32 --set group_count=3 --set n_hid=32 --set n_init=32 \
  --set warmup_steps=50 --set held_out=0.2
"$py" -m beit tokenizer reconstruct "$out/tokenizer.safetensors" "$out"/photos/{astronaut,chelsea,coffee,rocket}.jpg \
  -o "$out/reconstructions.png"
"$py" -m beit tokenize "$out/photos" "$out/store" --tokenizer "$out/tokenizer.safetensors" --overwrite \
  --views 8 --set view.image_size=128 --set chunk_images=8
"$py" -m beit store verify "$out/store" --sample 8
"$py" -m beit pretrain "$out/store" --out "$out/pretrain" --no-resume --model tiny --set model.depth=4 \
  --epochs 100 --batch-size 8 --lr 1e-3 --warmup-epochs 5 --set log_every=20
"$py" -m beit plot "$out/pretrain" -o "$out/pretrain-curves.png"
"$py" bench/train_step.py --demo
