"""The spread over seeds of what tests/test_pictures.py checks of the attention picture of a
randomised fine-tuned model (issue 11): `test_attention_command_writes_the_picture`'s model
with `randomized(..., seed=S)` after `torch.manual_seed(S)` instead of 0 and 0.

    python bench/pictures_seeds.py [--seeds 0-7]

Prints, per seed, the lowest peak (x uniform) and the highest entropy (fraction of log N) over
the picture's queries, and the grey-level standard deviation of that picture (the test checks
the standard deviation of another one, `beit attention`'s of a randomised MIM model), then
their ranges.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-7", help="'0-7' or '0,3,5'")
    args = parser.parse_args()

    import numpy as np
    import test_pictures
    import torch
    from photos import copy_photos
    from PIL import Image

    from beit.train.model import BeitClassifier, ModelConfig
    from beit.train.pretrain.pictures import attention_picture

    first, _, last = args.seeds.partition("-")
    seeds = list(range(int(first), int(last) + 1)) if last else [int(s) for s in args.seeds.split(",")]
    cfg = ModelConfig(**test_pictures.TINY).resolved()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        photos = copy_photos(Path(tmp) / "photos", ["astronaut.png", "coffee.png"])
        print("seed  min-peak  max-entropy  picture-std")
        for seed in seeds:
            torch.manual_seed(seed)
            model = test_pictures.randomized(BeitClassifier(cfg), seed=seed)
            out = Path(tmp) / f"ft{seed}.png"
            summaries = attention_picture(model, photos[:1], out)
            std = float(np.asarray(Image.open(out).convert("L")).std())
            rows.append((min(s["peak"] for s in summaries[0]), max(s["entropy"] for s in summaries[0]), std))
            print(f"{seed:4d}  {rows[-1][0]:8.3f}  {rows[-1][1]:11.3f}  {rows[-1][2]:11.1f}", flush=True)
    for name, column in zip(("min peak", "max entropy", "picture std"), zip(*rows, strict=True), strict=True):
        low, middle, high = min(column), np.median(column), max(column)
        print(f"{name} over {len(column)} seeds: min {low:.3f}, median {middle:.3f}, max {high:.3f}")


if __name__ == "__main__":
    main()
