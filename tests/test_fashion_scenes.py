"""The built-in segmentation task: Fashion-MNIST items scattered over noisy canvases, in the folder layout."""

import hashlib
import json

import numpy as np
import pytest
from helpers import beit_here
from PIL import Image

from beit.shared.datasets.fashion_mnist import CLASSES as ITEM_CLASSES
from beit.shared.datasets.fashion_mnist import load
from beit.shared.datasets.fashion_scenes import CLASSES, IGNORE_INDEX, draw_scene, write_scenes

SPLITS = ("training", "validation")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes") / "fashion"
    result = write_scenes(out, train=40, val=20, seed=1)
    return out, result


def pairs(out, split):
    for image_path in sorted((out / "images" / split).iterdir()):
        yield image_path.stem, Image.open(image_path), Image.open(out / "annotations" / split / image_path.name)


def test_the_layout_and_the_class_list(scenes):
    out, result = scenes
    assert result == {"training": 40, "validation": 20, "classes": CLASSES}
    assert CLASSES == ["background", *ITEM_CLASSES] and len(CLASSES) == 11
    assert json.loads((out / "classes.json").read_text()) == {
        "classes": CLASSES,
        "ignore_index": 255,
        "reduce_zero_label": False,
    }
    for split, count in (("training", 40), ("validation", 20)):
        images = sorted(p.name for p in (out / "images" / split).iterdir())
        assert images == sorted(p.name for p in (out / "annotations" / split).iterdir())
        assert images == [f"{split}_{i:05d}.png" for i in range(count)]


def test_each_mask_fits_its_image_and_holds_an_item_and_its_edges(scenes):
    out, _ = scenes
    sizes = set()
    for split in SPLITS:
        for name, image, mask in pairs(out, split):
            assert image.mode == "RGB" and mask.mode == "L", name
            assert image.size == mask.size and all(64 <= side <= 112 for side in image.size), name
            values = set(np.unique(np.asarray(mask)).tolist())
            assert values <= set(range(11)) | {IGNORE_INDEX}, name
            assert values & set(range(1, 11)), f"{name} has no labelled item pixel"
            assert IGNORE_INDEX in values, f"{name} has no ignore band"
            sizes.add(image.size)
    assert any(width != height for width, height in sizes)  # canvases are not all square


def test_the_ignore_band_lies_on_label_changes_only():
    images, labels = load()["train"]
    rng = np.random.default_rng(5)
    changes = banded_on_both_sides = 0
    for _ in range(30):
        scene = draw_scene(rng, images, labels)
        full, band = scene.label_without_band.astype(int), scene.label == IGNORE_INDEX
        assert np.array_equal(scene.label[~band], scene.label_without_band[~band])
        touches_change = np.zeros_like(band)
        for axis in (0, 1):
            change = np.diff(full, axis=axis) != 0
            before = [slice(None), slice(None)]
            after = [slice(None), slice(None)]
            before[axis], after[axis] = slice(None, -1), slice(1, None)
            touches_change[tuple(before)] |= change
            touches_change[tuple(after)] |= change
            first, second = band[tuple(before)][change], band[tuple(after)][change]
            assert np.all(first | second)  # every change of label between neighbours has the band beside it
            changes += change.sum()
            banded_on_both_sides += (first & second).sum()
        assert band.any() and not np.any(band & ~touches_change)
        assert not np.any(band & (full == 0))  # on the item's side, never the background's
    # one pixel thin: the band covers one side of a change, both only where two edges meet. Over
    # 8 generator seeds (0-7, 30 scenes each) 1.2-2.1% of changes are banded on both sides: the
    # bar, 10%, is about 5x the largest, and a two-pixel band would put it near 100%
    assert banded_on_both_sides < 0.1 * changes


def test_each_split_draws_only_its_own_items(scenes):
    out, _ = scenes
    record = json.loads((out / "scenes.json").read_text())
    subset = load()
    used = {}
    for split, subset_split in (("training", "train"), ("validation", "val")):
        images, labels = subset[subset_split]
        scenes_of_split = record["scenes"][split]
        assert len(scenes_of_split) == (40 if split == "training" else 20)
        used[split] = set()
        for name, items in scenes_of_split.items():
            assert 1 <= len(items) <= 4
            mask = np.asarray(Image.open(out / "annotations" / split / f"{name}.png"))
            for index, item_class in items:
                assert 0 <= index < len(images) and item_class == labels[index]
            # the pixels show no class the scene's recorded items lack
            shown = set(np.unique(mask).tolist()) - {0, IGNORE_INDEX}
            assert shown <= {item_class + 1 for _, item_class in items}, name
            used[split] |= {hashlib.sha1(images[index].tobytes()).hexdigest() for index, _ in items}
    assert used["training"] and used["validation"] and not used["training"] & used["validation"]


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_same_seed_writes_the_same_bytes(tmp_path):
    write_scenes(tmp_path / "a", train=6, val=3, seed=7)
    write_scenes(tmp_path / "b", train=6, val=3, seed=7)
    write_scenes(tmp_path / "c", train=6, val=3, seed=8)
    write_scenes(tmp_path / "d", train=2, val=1, seed=7)
    a, b, c, d = (files(tmp_path / name) for name in "abcd")
    assert a == b
    images = [path for path in a if path.suffix == ".png"]
    assert len(images) == 18 and all(a[path] != c[path] for path in images)
    # fewer scenes are the first of the same ones
    assert all(d[path] == a[path] for path in d if path.suffix == ".png")


def test_sides_and_item_scale_are_chosen_and_recorded(tmp_path):
    out = tmp_path / "small"
    result = beit_here("data", "fashion-scenes", out, "--train", "6", "--val", "2", "--sides", "40,48",
                       "--item-scale", "0.5,0.5")  # fmt: skip
    assert result.returncode == 0, result.stderr
    for split in SPLITS:
        for _, image, label in pairs(out, split):
            assert 40 <= min(image.size) <= max(image.size) <= 48 and label.size == image.size
    record = json.loads((out / "scenes.json").read_text())
    assert record["sides"] == [40, 48] and record["item_scale"] == [0.5, 0.5]
    # one item at scale 0.5 fits a 14 px square
    images, labels = load()["train"]
    for i in range(20):
        scene = draw_scene(np.random.default_rng(i), images, labels, 40, 48, items=(1, 1), scale=(0.5, 0.5))
        rows, cols = np.nonzero(scene.label_without_band)
        assert rows.max() - rows.min() < 14 and cols.max() - cols.min() < 14
    result = beit_here("data", "fashion-scenes", tmp_path / "bad", "--sides", "40")
    assert result.returncode == 1 and "--sides '40' is not two numbers" in result.stderr


def test_bad_arguments_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a range of positive sizes"):
        write_scenes(tmp_path / "x", min_side=80, max_side=64)
    with pytest.raises(ValueError, match="items per scene 0-2"):
        write_scenes(tmp_path / "x", items=(0, 2))
    with pytest.raises(ValueError, match="item scale 0.0-1.0 is not a range"):
        write_scenes(tmp_path / "x", scale=(0.0, 1.0))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "other.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        write_scenes(tmp_path / "full", train=1, val=1)
