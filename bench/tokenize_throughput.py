"""Stage 1 throughput end to end (views/s), where its time goes, and the released code's
approach on the same views, side by side.

    python bench/tokenize_throughput.py                      # CPU: a tiny tokenizer, 48 images, V = 10
    python bench/tokenize_throughput.py --images 2000 --released --json out.json   # GPU: released-size tokenizer

The images are realistic JPEGs (500x375, quality 90) cut from the photos scikit-image ships.
`beit tokenize` runs in this process on them (DALI decode once per image, V renders, the
tokenizer once per view, zarr writes); its summary splits the time into peek, decode+render,
encoder and write. Then the released approach tokenizes the very same views (their recorded
parameters): per view, Pillow decodes the file, applies colour jitter (ImageEnhance, as
torchvision does on PIL images), flip, crop and Lanczos resize to 112, in a pool of one
worker per core (the reference uses DataLoader workers), then the same encoder in the same
precision and batch size. Note: the released pipeline rendered the 224 px twin too; it is
not counted here, which favours the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from beit.shared.dvae import DVAE, DVAEConfig, save_tokenizer
from beit.shared.store import TokenStore
from beit.tokenize.run import TokenizeConfig, tokenize

PHOTOS = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
]


def make_jpegs(folder: Path, count: int) -> list[Path]:
    """`count` 500x375 quality-90 JPEGs: random crops of scikit-image's colour photos."""
    import importlib.util

    from PIL import Image

    data = Path(next(iter(importlib.util.find_spec("skimage").submodule_search_locations))) / "data"
    photos = [Image.open(data / name).convert("RGB") for name in PHOTOS]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        photo = photos[i % len(photos)]
        scale = rng.uniform(0.6, 1.0)
        w, h = int(photo.width * scale), int(photo.width * scale * 0.75)
        h = min(h, photo.height)
        x, y = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
        path = folder / f"{i:05d}.jpg"
        photo.crop((x, y, x + w, y + h)).resize((500, 375), Image.BICUBIC).save(path, quality=90)
        files.append(path)
    return files


def _reference_views(job: tuple[str, np.ndarray, int]) -> np.ndarray:
    """The released approach for one image's views: decode per view, jitter, flip, crop, resize."""
    from PIL import Image, ImageEnhance

    path, params, size = job
    out = []
    for x, y, w, h, flip, brightness, contrast, saturation in params:
        image = Image.open(path).convert("RGB")
        image = ImageEnhance.Brightness(image).enhance(float(brightness))
        image = ImageEnhance.Contrast(image).enhance(float(contrast))
        image = ImageEnhance.Color(image).enhance(float(saturation))
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image = image.resize((size, size), Image.LANCZOS, box=(float(x), float(y), float(x + w), float(y + h)))
        out.append(np.asarray(image))
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--views", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=0, help="images per batch (default 32 GPU, 8 CPU)")
    parser.add_argument("--released", action="store_true", help="the released-size tokenizer (else a tiny one)")
    parser.add_argument("--workdir", type=Path, help="keep the images and store here")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="beit-bench-"))
    files = make_jpegs(work / "images", args.images)
    torch.manual_seed(0)
    arch = DVAEConfig() if args.released else DVAEConfig(n_hid=16, blocks_per_group=1, vocab_size=1024, n_init=16)
    model = DVAE(arch, with_decoder=False)
    tokenizer = work / "tokenizer.safetensors"
    save_tokenizer(model, tokenizer, input_size=112)
    store = work / "store.zarr"
    shutil.rmtree(store, ignore_errors=True)
    cfg = TokenizeConfig(
        views=args.views,
        batch_size=args.batch_size or (32 if cuda else 8),
        chunk_images=64,
        threads=0,  # the command's default: this rank's share of the cores (decode.dali_threads)
    )
    start = time.perf_counter()
    summary = tokenize(work / "images", str(store), tokenizer, cfg, progress=False)
    ours_seconds = time.perf_counter() - start
    views = summary["done"] * args.views
    ours = views / ours_seconds
    print(
        f"device: {torch.cuda.get_device_name() if cuda else f'CPU, {os.cpu_count()} cores'}; "
        f"{'released' if args.released else 'tiny'} tokenizer; {summary['done']} images x {args.views} views"
    )
    split = ", ".join(f"{k} {v:.2f} s" for k, v in summary["time"].items())
    print(f"beit tokenize: {ours:8.1f} views/s end to end ({ours_seconds:.1f} s, incl. set-up; inside: {split})")

    # the released approach on the same views
    params = TokenStore.open(str(store)).view_params()
    encoder = model.to(device).eval()
    dtype = torch.float16 if cuda else None
    jobs = [(str(f), params[i], 112) for i, f in enumerate(files)]
    start = time.perf_counter()
    augment = encode = 0.0
    batch = cfg.batch_size
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for b0 in range(0, len(jobs), batch):
            t0 = time.perf_counter()
            pixels = np.concatenate(list(pool.map(_reference_views, jobs[b0 : b0 + batch])))
            t1 = time.perf_counter()
            tensor = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float() / 255
            encoder.tokenize(tensor, dtype=dtype)
            if cuda:
                torch.cuda.synchronize()
            augment += t1 - t0
            encode += time.perf_counter() - t1
    reference_seconds = time.perf_counter() - start
    reference = views / reference_seconds
    print(f"released approach: {reference:8.1f} views/s (Pillow per view {augment:.2f} s, encoder {encode:.2f} s)")
    print(f"ratio: beit tokenize is {ours / reference:.2f}x the released approach")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "device": torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores",
                    "tokenizer": "released" if args.released else "tiny",
                    "images": summary["done"],
                    "views": args.views,
                    "ours_views_per_s": ours,
                    "ours_time": summary["time"],
                    "reference_views_per_s": reference,
                    "reference_time": {"pillow": augment, "encoder": encode},
                    "ratio": ours / reference,
                    "date": time.strftime("%Y-%m-%d"),
                },
                indent=2,
            )
        )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
