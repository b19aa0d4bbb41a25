"""Stage 1 throughput end to end (views/s), where its time goes, and the released code's
approach on the same views, side by side.

    python bench/speed/tokenize_throughput.py                      # CPU: a tiny tokenizer, 48 images, V = 10
    python bench/speed/tokenize_throughput.py --images 12000 --released --jpegs /tmp/beit-jpegs \
        --reference-images 1000 --json out.json             # GPU: released-size tokenizer

The images are realistic JPEGs (bench/speed/jpegs.py: 500x375, quality 90, cut from the photos
scikit-image ships). `beit tokenize` runs in this process on them (DALI decode once per image, V
renders, the tokenizer once per view, zarr writes); its summary splits the time into peek,
decode+render, encoder and write. Two figures: end to end (set-up included: listing, tokenizer
load, store creation, pipeline builds), and steady state (views/s after the first chunk of
--chunk-images images), with set-up's share of the run; the stage's bar is the steady state, on a
run long enough that set-up is a small share. The JSON is written after each measurement.

Then the released approach tokenizes the very same views (their recorded parameters; of the
first --reference-images images): per view, Pillow decodes the file, applies colour jitter
(ImageEnhance, as torchvision does on PIL images), flip, crop and Lanczos resize to 112, in a pool of one
worker per core (the reference uses DataLoader workers), then the same encoder in the same
precision and batch size. Note: the released pipeline rendered the 224 px twin too; it is
not counted here, which favours the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from jpegs import make_jpegs  # noqa: E402

from beit.shared.dvae import DVAE, DVAEConfig, save_tokenizer  # noqa: E402
from beit.shared.store import TokenStore  # noqa: E402
from beit.tokenize.stage1 import TokenizeConfig, tokenize  # noqa: E402


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
    parser.add_argument("--chunk-images", type=int, default=256, help="images per store chunk")
    parser.add_argument("--released", action="store_true", help="the released-size tokenizer (else a tiny one)")
    parser.add_argument("--jpegs", type=Path, help="the JPEG folder (bench/speed/jpegs.py; made or grown as needed)")
    parser.add_argument(
        "--reference-images", type=int, default=0, help="images the released approach runs on (default: all)"
    )
    parser.add_argument("--workdir", type=Path, help="keep the tokenizer and store here")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="beit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = args.jpegs or work / "images"
    files = make_jpegs(folder, args.images)
    images = work / "images-listed.txt"  # exactly these files, whatever else the folder holds
    images.write_text("".join(f"{f}\n" for f in files))
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
        chunk_images=args.chunk_images,
        threads=0,  # the command's default: this rank's share of the cores (decode.dali_threads)
    )
    name = torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores"
    result = {
        "device": name,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "tokenizer": "released" if args.released else "tiny",
        "views": args.views,
        "batch_size": cfg.batch_size,
        "chunk_images": cfg.chunk_images,
    }

    def write() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    start = time.perf_counter()
    # the progress bar's rate reaches the log every 10 s: a run cut before it ends still says how fast it went
    summary = tokenize(images, str(store), tokenizer, cfg, progress=True)
    ours_seconds = time.perf_counter() - start
    views = summary["done"] * args.views
    setup = summary["setup_seconds"]  # before the first batch: listing, tokenizer load, store, pipeline builds
    result |= {
        "images": summary["done"],
        "ours_views_per_s": views / ours_seconds,  # end to end, set-up included
        "ours_steady_views_per_s": summary["steady_views_per_s"],  # after the first chunk
        "ours_seconds": ours_seconds,
        "ours_setup_seconds": setup,
        "ours_setup_share": setup / ours_seconds,
        "ours_time": summary["time"],
    }
    write()
    print(f"device: {name}; {result['tokenizer']} tokenizer; {summary['done']} images x {args.views} views")
    split = ", ".join(f"{k} {v:.2f} s" for k, v in summary["time"].items())
    steady = summary["steady_views_per_s"]
    print(
        f"beit tokenize: {views / ours_seconds:8.1f} views/s end to end ({ours_seconds:.1f} s, of which set-up "
        f"{setup:.1f} s = {setup / ours_seconds * 100:.0f}%); steady state {steady or float('nan'):8.1f} views/s "
        f"after the first chunk; inside: {split}",
        flush=True,
    )

    # the released approach on the same views (the first --reference-images images' views)
    params = TokenStore.open(str(store)).view_params()
    count = min(args.reference_images or len(files), len(files))
    encoder = model.to(device).eval()
    dtype = torch.float16 if cuda else None
    jobs = [(str(f), params[i], 112) for i, f in enumerate(files[:count])]
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
    reference = count * args.views / (time.perf_counter() - start)
    result |= {
        "reference_images": count,
        "reference_views_per_s": reference,
        "reference_time": {"pillow": augment, "encoder": encode},
        "ratio": result["ours_views_per_s"] / reference,
    }
    write()
    print(f"released approach: {reference:8.1f} views/s on {count} images (Pillow per view {augment:.2f} s, "
          f"encoder {encode:.2f} s)")  # fmt: skip
    print(f"ratio: beit tokenize end to end is {result['ratio']:.2f}x the released approach")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
