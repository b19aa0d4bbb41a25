"""The spread of a short tokenizer training over seeds (issue 11): the workload of
tests/test_dvae_train.py (its photos, its SMALL settings, its steps), once per seed.

    python bench/tokenizer_seeds.py [--seeds 0-7] [--threads 2] [--deterministic] [--set k=v ...]

Each seed runs in-process, one after another (`train_dvae`, no resume); the table gives the
held-out PSNR, the mean-colour baseline on the same crops, their gap and the codes used, then
min / median / max of the gap. `--set` overrides DVAETrainConfig keys on top of the test's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def test_settings() -> tuple[list[str], int]:
    """The test's SMALL overrides as `key=value` strings, and its steps (read from the test file,
    so the two cannot drift apart)."""
    import test_dvae_train

    small, overrides = list(test_dvae_train.SMALL), []
    flags = {"--input-size": "input_size", "--vocab-size": "vocab_size", "--batch-size": "batch_size"}
    while small:
        flag, value = small.pop(0), small.pop(0)
        overrides.append(value if flag == "--set" else f"{flags[flag]}={value}")
    return overrides, test_dvae_train.STEPS


def seeds_of(text: str) -> list[int]:
    """'0-7' or '0,3,5'."""
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(s) for s in text.split(",")]


def all_photos(model, stream, batches: int = 16) -> dict:
    """PSNR of hard-token reconstructions of the same random crops of all the photos for every
    seed (train and held-out alike: the model's quality without the split's luck), against the
    mean colour of the whole batch (the trainer's old baseline) and of each crop."""
    import math

    import torch
    import torch.nn.functional as F

    errors, batch_mean, crop_mean = [], [], []
    with torch.no_grad():
        for _ in range(batches):
            pixels = stream.next()
            errors.append(F.mse_loss(model.reconstruct(model.tokenize(pixels)), pixels).item())
            batch_mean.append(F.mse_loss(pixels.mean(dim=(0, 2, 3), keepdim=True).expand_as(pixels), pixels).item())
            crop_mean.append(F.mse_loss(pixels.mean(dim=(2, 3), keepdim=True).expand_as(pixels), pixels).item())
    return {
        name: 10 * math.log10(1 / (sum(values) / len(values)))
        for name, values in (("psnr", errors), ("batch_mean_psnr", batch_mean), ("crop_mean_psnr", crop_mean))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-7")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    parser.add_argument("--steps", type=int, help="instead of the test's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="DVAETrainConfig key=value")
    parser.add_argument("--json", type=Path, help="append one JSON line per seed here")
    parser.add_argument(
        "--whole-photos", action="store_true", help="the test's data before issue 11: 16 whole 160 px photos"
    )
    args = parser.parse_args()

    import numpy as np
    import test_dvae_train
    import torch
    from photos import COLOUR, GREY, copy_photos, save_jpeg

    from beit.shared.config import load_config
    from beit.shared.dvae import load_tokenizer
    from beit.shared.images import list_images
    from beit.train.tokenizer.trainer import CropStream, DVAETrainConfig, train_dvae

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(args.deterministic)
    overrides, steps = test_settings()
    overrides.append(f"steps={args.steps or steps}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        if args.whole_photos:
            folder.mkdir()
            for path in copy_photos(Path(tmp) / "source", COLOUR + GREY):
                save_jpeg(path, folder / f"{path.stem}.jpg", 160)
        else:
            test_dvae_train.write_photos(Path(tmp) / "source", folder)
        gaps, fixed_gaps = [], []
        print(
            f"settings: {' '.join(overrides + args.overrides)}; threads {args.threads}, deterministic "
            f"{args.deterministic}, {'whole photos' if args.whole_photos else 'tiles'}"
        )
        print("seed  psnr  baseline  gap  codes  held-out  all-photos: psnr  gap-to-batch-mean  gap-to-crop-mean  s")
        for seed in seeds_of(args.seeds):
            cfg = load_config(DVAETrainConfig, None, [*overrides, *args.overrides, f"seed={seed}"])
            start = time.perf_counter()
            out = Path(tmp) / f"tok{seed}.safetensors"
            report = train_dvae(folder, out, cfg, resume=False, progress=False)
            held = report["held_out"]
            # the same crops of all the photos for every seed: the model's quality without the split's luck
            fixed = all_photos(load_tokenizer(out), CropStream(list_images(folder), cfg, 2024, torch.device("cpu")))
            fixed_gaps.append(fixed["psnr"] - fixed["crop_mean_psnr"])
            gap = held["psnr"] - held["baseline_psnr"]
            gaps.append(gap)
            print(
                f"{seed:4d}  {held['psnr']:.2f}  {held['baseline_psnr']:.2f}  {gap:.2f}  {held['codes_used']:5d}"
                f"  {report['held_out_images']:8d}  {fixed['psnr']:16.2f}"
                f"  {fixed['psnr'] - fixed['batch_mean_psnr']:17.2f}  {fixed_gaps[-1]:16.2f}"
                f"  {time.perf_counter() - start:.0f}",
                flush=True,
            )
            if args.json:
                record = {"seed": seed, "threads": args.threads, "deterministic": args.deterministic, **held}
                record["whole_photos"] = args.whole_photos
                record["all_photos"] = fixed
                with args.json.open("a") as f:
                    f.write(json.dumps({**record, "overrides": args.overrides}) + "\n")
        for name, values in (("held-out gap", gaps), ("all-photos gap to each crop's mean colour", fixed_gaps)):
            print(
                f"{name} over {len(values)} seeds: min {min(values):.2f}, median {np.median(values):.2f}, "
                f"max {max(values):.2f} dB"
            )


if __name__ == "__main__":
    main()
