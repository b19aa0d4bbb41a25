"""Realistic JPEGs for the throughput benchmarks: 500x375, quality 90, cut from the colour photos
scikit-image ships. Made once, by every core, and reused: image i is the same file whoever asks
for it and however many are asked for, so a folder of 2,000 grows to 12,000 by making the rest.

    python bench/speed/jpegs.py /tmp/beit-jpegs 12000      # prints how many were made and how long it took
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

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
_photos: list = []


def _photo(index: int):
    if not _photos:
        import importlib.util

        from PIL import Image

        data = Path(next(iter(importlib.util.find_spec("skimage").submodule_search_locations))) / "data"
        _photos.extend(Image.open(data / name).convert("RGB") for name in PHOTOS)
    return _photos[index % len(_photos)]


def _make(job: tuple[Path, int]) -> None:
    """Image i: a random crop (its own seed) of photo i mod 9, resized to 500x375. Written under a
    temporary name and renamed, so a file that exists is whole."""
    from PIL import Image

    path, i = job
    photo = _photo(i)
    rng = np.random.default_rng([0, i])
    scale = rng.uniform(0.6, 1.0)
    w = int(photo.width * scale)
    h = min(int(photo.width * scale * 0.75), photo.height)
    x, y = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
    part = path.with_suffix(".part")
    photo.crop((x, y, x + w, y + h)).resize((500, 375), Image.BICUBIC).save(part, format="JPEG", quality=90)
    part.rename(path)


def make_jpegs(folder: Path, count: int, workers: int = 0) -> list[Path]:
    """The first `count` images under `folder` (00000.jpg ...), making those that are missing with
    one process per core."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"{i:05d}.jpg" for i in range(count)]
    missing = [(path, i) for i, path in enumerate(files) if not path.exists()]
    if len(missing) > 64:
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
            list(pool.map(_make, missing, chunksize=32))
    else:
        for job in missing:
            _make(job)
    return files


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    start = time.perf_counter()
    folder, count = Path(sys.argv[1]), int(sys.argv[2])
    before = sum(1 for _ in folder.glob("*.jpg")) if folder.exists() else 0
    make_jpegs(folder, count)
    print(f"{count} JPEGs under {folder} ({max(count - before, 0)} made, {os.cpu_count()} cores, "
          f"{time.perf_counter() - start:.1f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
