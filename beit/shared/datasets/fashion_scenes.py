"""Fashion scenes: a small, real semantic segmentation task built from the shipped Fashion-MNIST subset.

Each scene is a canvas whose height and width are drawn independently from [min_side, max_side]
(64-112 px by default, so most scenes are not square), filled with one grey level drawn at random,
holding one to four items of the subset. Each item is scaled by a factor drawn from `scale`
(0.6-2.0 by default) of its 28 px (bilinear, so the outline stays smooth at 2x), tinted with a
colour of its own (the item's grey intensity times a random RGB colour, so that neither brightness
nor hue tells the classes apart) and placed at random wholly inside the canvas; later items cover
earlier ones. Gaussian noise of a random strength is then added to every pixel. An item is drawn
only where its scaled intensity is above 0.1 of white, and exactly those pixels carry its label,
class + 1; the rest is background, 0. Where the label changes, the pixel on the side of the item on
top (never the background's side) is set to 255, a one-pixel unlabelled band like the borders of
ADE20K's annotations.

Training scenes use only the subset's training items, validation scenes only its validation items
(drawn from the official test split). Scene i of a split is drawn from its own generator seeded with
(seed, split, i), so the same seed writes byte-identical files and asking for fewer scenes writes
the first of the same ones.

The layout is the plain `folder` format the segmentation reader takes:

    OUT/images/{training,validation}/{split}_NNNNN.png        RGB
    OUT/annotations/{training,validation}/{split}_NNNNN.png   "L": class indices, 255 = ignore
    OUT/classes.json    {"classes": ["background", "t-shirt", ...], "ignore_index": 255,
                         "reduce_zero_label": false}
    OUT/scenes.json     how the scenes were drawn, and per scene its items as [index, class]
                        pairs, the index into its split of the shipped subset ("train" for
                        training scenes, "val" for validation scenes)

What the task can show: whether pre-training helps a segmenter tell apart the shapes and textures of
clothes, and find their outlines among clutter and occlusion, when few scenes are labelled; it runs
in minutes on a CPU. What it cannot show: ADE20K's 150 classes of natural scenes, their scale (20k
training images of about 512 px), their context (a bed implies a bedroom), their long tail of rare
classes, or objects that are not one flat item on a plain background. Numbers on it rank methods;
they say nothing of the mIoU to expect on ADE20K.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from beit.shared.datasets import fashion_mnist

CLASSES = ["background", *fashion_mnist.CLASSES]
IGNORE_INDEX = 255
SCALE = (0.6, 2.0)  # of the 28 px item
THRESHOLD = 0.1  # of white: an item's pixels at or below it are not drawn and not labelled
LEVEL = (16.0, 240.0)  # background grey level
NOISE = (2.0, 16.0)  # standard deviation of the Gaussian noise, in grey levels
TINT = (40.0, 255.0)  # each channel of an item's colour
SPLITS = {"training": "train", "validation": "val"}  # folder name: split of the shipped subset


@dataclass
class Scene:
    image: np.ndarray  # [H, W, 3] uint8
    label: np.ndarray  # [H, W] uint8: class indices, 255 on the band
    label_without_band: np.ndarray  # [H, W] uint8: what `label` is before the band is cut out
    items: list[tuple[int, int]]  # (index into the split, class) of each item, bottom first


def ignore_band(label: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """[H, W] bool: the pixels that touch (4-neighbours) a pixel of another label and lie on the side
    of the item on top (`owner`, the z-order of the visible item, -1 for background, is higher)."""
    band = np.zeros(label.shape, dtype=bool)
    for axis in (0, 1):
        first = [slice(None), slice(None)]
        second = [slice(None), slice(None)]
        first[axis], second[axis] = slice(None, -1), slice(1, None)
        first, second = tuple(first), tuple(second)
        change = label[first] != label[second]
        first_on_top = owner[first] > owner[second]  # owners differ wherever labels do
        band[first] |= change & first_on_top
        band[second] |= change & ~first_on_top
    return band


def scale_item(image: np.ndarray, side: int) -> np.ndarray:
    """[side, side] float32 in 0..1: a 28x28 uint8 item resized bilinearly."""
    from PIL import Image

    if side == image.shape[0]:
        return image.astype(np.float32) / 255
    resized = Image.fromarray(image).resize((side, side), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255


def draw_scene(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    min_side: int = 64,
    max_side: int = 112,
    items: tuple[int, int] = (1, 4),
    scale: tuple[float, float] = SCALE,
) -> Scene:
    """One scene of items drawn from `images` [N, 28, 28] uint8 with classes `labels` [N]; drawn
    again (from the same generator) in the rare case that no item pixel keeps its label."""
    for _ in range(100):
        height, width = (int(side) for side in rng.integers(min_side, max_side + 1, size=2))
        canvas = np.full((height, width, 3), rng.uniform(*LEVEL), dtype=np.float32)
        label = np.zeros((height, width), dtype=np.uint8)
        owner = np.full((height, width), -1, dtype=np.int16)
        chosen = rng.integers(0, len(images), size=int(rng.integers(items[0], items[1] + 1)))
        for depth, index in enumerate(chosen):
            side = max(1, min(round(28 * rng.uniform(*scale)), height, width))
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, width - side + 1))
            tint = rng.uniform(*TINT, size=3).astype(np.float32)
            item = scale_item(images[index], side)
            drawn = item > THRESHOLD
            window = np.s_[top : top + side, left : left + side]
            canvas[window][drawn] = item[drawn, None] * tint
            label[window][drawn] = labels[index] + 1
            owner[window][drawn] = depth
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(rng.uniform(*NOISE))
        band = ignore_band(label, owner)
        if np.any(label[~band] > 0):
            return Scene(
                image=np.clip(np.rint(canvas), 0, 255).astype(np.uint8),
                label=np.where(band, np.uint8(IGNORE_INDEX), label),
                label_without_band=label,
                items=[(int(i), int(labels[i])) for i in chosen],
            )
    raise RuntimeError("100 scenes in a row had no labelled item pixel: the items are blank.")


def _check(
    out: Path, train: int, val: int, min_side: int, max_side: int, items: tuple[int, int], scale: tuple[float, float]
) -> None:
    if train < 0 or val < 0:
        raise ValueError(f"scene counts must not be negative (got train={train}, val={val}).")
    if not 1 <= min_side <= max_side:
        raise ValueError(f"sides {min_side}-{max_side} are not a range of positive sizes: give 1 <= min <= max.")
    if not 1 <= items[0] <= items[1]:
        raise ValueError(f"items per scene {items[0]}-{items[1]} is not a range: give 1 <= fewest <= most.")
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"item scale {scale[0]}-{scale[1]} is not a range of positive factors: give 0 < low <= high.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder: pass a new or empty folder.")


def write_scenes(
    out: Path,
    train: int = 800,
    val: int = 200,
    seed: int = 0,
    min_side: int = 64,
    max_side: int = 112,
    items: tuple[int, int] = (1, 4),
    scale: tuple[float, float] = SCALE,
) -> dict:
    """Write `train` training and `val` validation scenes under `out` (a new or empty folder) in the
    layout above; returns {"training": count, "validation": count, "classes": CLASSES}."""
    from PIL import Image

    out = Path(out)
    items = (int(items[0]), int(items[1]))
    scale = (float(scale[0]), float(scale[1]))
    _check(out, train, val, min_side, max_side, items, scale)
    subset = fashion_mnist.load()
    record = {
        "source": "the shipped Fashion-MNIST subset (beit/shared/datasets/data/fashion_mnist_subset.npz)",
        "seed": seed,
        "sides": [min_side, max_side],
        "items_per_scene": list(items),
        "item_scale": list(scale),
        "item_splits": SPLITS,
        "scenes": {},
    }
    counts = {}
    for number, (split, subset_split) in enumerate(SPLITS.items()):
        images, labels = subset[subset_split]
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        drawn = {}
        for i in range(train if split == "training" else val):
            name = f"{split}_{i:05d}"
            rng = np.random.default_rng([seed, number, i])
            scene = draw_scene(rng, images, labels, min_side, max_side, items, scale)
            Image.fromarray(scene.image).save(out / "images" / split / f"{name}.png")
            Image.fromarray(scene.label).save(out / "annotations" / split / f"{name}.png")
            drawn[name] = [list(item) for item in scene.items]
        record["scenes"][split] = drawn
        counts[split] = len(drawn)
    classes = {"classes": CLASSES, "ignore_index": IGNORE_INDEX, "reduce_zero_label": False}
    (out / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    (out / "scenes.json").write_text(json.dumps(record) + "\n")
    return {**counts, "classes": list(CLASSES)}
