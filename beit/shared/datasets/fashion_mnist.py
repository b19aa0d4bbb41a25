"""Fashion-MNIST (Zalando, MIT licence): the project's built-in labelled images.

A class-balanced subset ships inside the package (`data/fashion_mnist_subset.npz`: 8,000
training and 2,000 test images, 28x28 grey, drawn with a fixed seed from the official files);
the full set (70,000) is read from the official idx files when a folder holding them is given,
e.g. Debian's `dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist) or the
original downloads. `write_imagefolder` writes train/ and val/ ImageFolder trees of PNGs at a
chosen size, the layout every beit command reads.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
SUBSET = Path(__file__).parent / "data" / "fashion_mnist_subset.npz"
DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path} is not an idx file of unsigned bytes: pass the official Fashion-MNIST files.")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated ({array.size} of {int(np.prod(shape))} values): fetch it again.")
    return array.reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{folder} has no {stem}(.gz): pass the folder holding the four official Fashion-MNIST files.")


def load(source: Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images [N, 28, 28] uint8, labels [N]), "val": (...)}: the shipped subset, or
    the official files in `source` (their test split is the val split)."""
    if source is None:
        with np.load(SUBSET) as data:
            return {
                "train": (data["train_images"], data["train_labels"]),
                "val": (data["val_images"], data["val_labels"]),
            }
    source = Path(source)
    if not source.is_dir():
        raise ValueError(f"{source} is not a folder: pass the folder holding the official Fashion-MNIST files.")
    return {
        "train": (
            _read_idx(_find(source, "train-images-idx3-ubyte")),
            _read_idx(_find(source, "train-labels-idx1-ubyte")),
        ),
        "val": (_read_idx(_find(source, "t10k-images-idx3-ubyte")), _read_idx(_find(source, "t10k-labels-idx1-ubyte"))),
    }


def balanced(labels: np.ndarray, count: int | None, seed: int) -> np.ndarray:
    """Indices of `count` samples (all when None), as equal per class as possible, seeded."""
    if count is None or count >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    base, extra = divmod(count, len(classes))
    chosen = [members[: base + (i < extra)] for i, members in enumerate(per_class)]
    return np.sort(np.concatenate(chosen))


def write_imagefolder(
    out: Path,
    size: int = 28,
    source: Path | None = None,
    train: int | None = None,
    val: int | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Write out/train/<class>/*.png and out/val/<class>/*.png; returns the counts written."""
    from PIL import Image

    splits = load(source)
    out = Path(out)
    counts = {}
    for split, wanted in (("train", train), ("val", val)):
        images, labels = splits[split]
        chosen = balanced(labels, wanted, seed)
        for name in CLASSES:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for i in chosen:
            image = Image.fromarray(images[i], mode="L")
            if size != image.width:
                image = image.resize((size, size), Image.BICUBIC)
            image.save(out / split / CLASSES[labels[i]] / f"{split}-{i:05d}.png")
        counts[split] = len(chosen)
    return counts


def make_subset(source: Path, out: Path = SUBSET, train: int = 8000, val: int = 2000, seed: int = 0) -> None:
    """Build the shipped subset from the official files (how the shipped file was made)."""
    splits = load(source)
    arrays = {}
    for split, count in (("train", train), ("val", val)):
        images, labels = splits[split]
        chosen = balanced(labels, count, seed)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[chosen], labels[chosen]
    np.savez_compressed(out, **arrays)
