"""Segmentation data on tiny trees written here: each layout read with and without its format
named, the label conventions, one clear error for each bad input, and training batches through
real DALI CPU pipelines (shapes, image and mask aligned, deterministic, sharded by rank)."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from beit.shared.views import IMAGENET_MEAN, IMAGENET_STD
from beit.train.segment.augment import adjust_hsv, choose_crop, nearest_indices, rescaled_size
from beit.train.segment.data import SegmentationData
from beit.train.segment.datasets import read_segmentation

H, W = 40, 56


def voc_palette() -> list[int]:
    """Pascal VOC's colour map: index i is never the colour (i, i, i)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def save(path, array, palette=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array, dtype=np.uint8))
    if palette is not None:
        image.putpalette(palette)  # an "L" image becomes a "P" image with the same indices
    image.save(path)


def photo(seed: int, size=(H, W)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def label_map(seed: int, values, size=(H, W)):
    return np.random.default_rng(seed + 100).choice(np.asarray(values, dtype=np.uint8), size=size)


def write_ade(root, train=3, val=2):
    base = root / "ADEChallengeData2016"
    for split, count in (("training", train), ("validation", val)):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            name = f"ADE_{split[:5]}_{i:08d}"
            save(base / "images" / split / f"{name}.jpg", photo(i))
            save(base / "annotations" / split / f"{name}.png", label_map(i, [0, 1, 7, 150]))
    return base


def write_voc(root, train=3, val=2):
    base = root / "VOCdevkit" / "VOC2012"
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for split, count in (("train", train), ("val", val)):
        ids = [f"2007_{split}{i:03d}" for i in range(count)]
        (lists / f"{split}.txt").write_text("".join(f"{key}\n" for key in ids))
        for i, key in enumerate(ids):
            save(base / "JPEGImages" / f"{key}.jpg", photo(i))
            save(base / "SegmentationClass" / f"{key}.png", label_map(i, [0, 1, 15, 20, 255]), voc_palette())
    return base


def write_cityscapes(root, train_ids=True):
    for split, cities in (("train", ("aachen", "bochum")), ("val", ("lindau",))):
        for i, city in enumerate(cities):
            name = f"{city}_000000_{i:06d}"
            save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", photo(i))
            save(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", label_map(i, [7, 8, 33]))
            if train_ids:
                save(root / "gtFine" / split / city / f"{name}_gtFine_labelTrainIds.png", label_map(i, [0, 18, 255]))
    return root


def write_folder(root, classes=("sky", "sea", "sand"), split_names=("train", "val"), suffix=".png"):
    for split, count in zip(split_names, (3, 2), strict=True):
        for i in range(count):
            save(root / "images" / split / "sub" / f"scene{i}{suffix}", photo(i))
            save(root / "annotations" / split / "sub" / f"scene{i}.png", label_map(i, [0, 1, 2, 255]))
    if classes:
        (root / "classes.json").write_text(json.dumps({"classes": list(classes), "ignore_index": 255}))
    return root


WRITERS = {"ade20k": write_ade, "voc": write_voc, "cityscapes": write_cityscapes, "folder": write_folder}


@pytest.mark.parametrize("format", list(WRITERS))
def test_each_layout_is_read_with_and_without_its_format_named(tmp_path, format):
    WRITERS[format](tmp_path)
    expected = {"ade20k": (150, "wall"), "voc": (21, "background"), "cityscapes": (19, "road"), "folder": (3, "sky")}
    counts = {"train": 2, "val": 1} if format == "cityscapes" else {"train": 3, "val": 2}
    for split, count in counts.items():
        for named in (None, format):
            source = read_segmentation(tmp_path, split, named)
            assert source.format == format
            assert len(source.images) == len(source.masks) == len(source.keys) == count
            assert (source.num_classes, source.class_names[0]) == expected[format]
            assert len(source.class_names) == source.num_classes and source.ignore_index == 255
            assert source.sizes == [(H, W)] * len(source.images)
            assert all(mask.is_file() for mask in source.masks)
    if format == "cityscapes":
        assert read_segmentation(tmp_path, "train").keys == [
            "aachen/aachen_000000_000000",
            "bochum/bochum_000000_000001",
        ]
    if format == "folder":
        assert read_segmentation(tmp_path, "train").keys == ["sub/scene0", "sub/scene1", "sub/scene2"]


def test_voc_is_found_from_the_voc2012_folder_and_the_folders_above(tmp_path):
    base = write_voc(tmp_path)
    for data in (base, base.parent, base.parent.parent):
        source = read_segmentation(data, "val")
        assert source.format == "voc" and source.keys == ["2007_val000", "2007_val001"] and source.root == base


def test_ade20k_reduces_zero_label(tmp_path):
    base = write_ade(tmp_path)
    mask = np.array([[0, 1, 7, 150, 255]], dtype=np.uint8)
    save(base / "annotations" / "training" / "ADE_train_00000000.png", np.tile(mask, (H, 12))[:, :W])
    source = read_segmentation(tmp_path, "train")
    assert source.reduce_zero_label and source.ignore_index == 255
    loaded = source.load_mask(source.masks[0])
    assert loaded.dtype == np.uint8 and loaded.shape == (H, W)
    assert loaded[0, :5].tolist() == [255, 0, 6, 149, 255]  # 0 -> ignored, k -> k - 1, 255 stays ignored
    plain = read_segmentation(tmp_path, "train", reduce_zero_label=False)
    assert "label 150" in error(lambda: plain.load_mask(plain.masks[1]))  # unreduced, 150 is past the classes


def test_voc_palette_masks_are_read_as_indices_and_255_stays_ignored(tmp_path):
    base = write_voc(tmp_path)
    stored = Image.open(base / "SegmentationClass" / "2007_train000.png")
    assert stored.mode == "P" and stored.getpalette()[3:6] == [128, 0, 0]  # colour of index 1 is not (1, 1, 1)
    source = read_segmentation(tmp_path, "train")
    loaded = source.load_mask(source.masks[0])
    assert np.array_equal(loaded, label_map(0, [0, 1, 15, 20, 255]))
    assert set(np.unique(loaded)) == {0, 1, 15, 20, 255} and not source.reduce_zero_label


def test_cityscapes_train_ids_are_taken_as_they_are(tmp_path):
    write_cityscapes(tmp_path)
    source = read_segmentation(tmp_path, "train")
    assert all(m.name.endswith("_gtFine_labelTrainIds.png") for m in source.masks)
    assert np.array_equal(source.load_mask(source.masks[1]), label_map(1, [0, 18, 255]))


def test_folder_settings_come_from_classes_json_or_the_options(tmp_path):
    write_folder(tmp_path, classes=None, split_names=("training", "validation"), suffix=".jpg")
    source = read_segmentation(tmp_path, "val", num_classes=3)
    assert source.class_names == ["0", "1", "2"] and len(source.images) == 2
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["a", "b", "c", "d"], "reduce_zero_label": True}))
    source = read_segmentation(tmp_path, "train")
    assert source.class_names == ["a", "b", "c", "d"] and source.reduce_zero_label
    assert read_segmentation(tmp_path, "train", reduce_zero_label=False, ignore_index=250).ignore_index == 250


def error(call) -> str:
    with pytest.raises(ValueError) as raised:
        call()
    return str(raised.value)


def test_a_missing_mask_names_the_image(tmp_path):
    base = write_ade(tmp_path)
    (base / "annotations" / "training" / "ADE_train_00000001.png").unlink()
    message = error(lambda: read_segmentation(tmp_path, "train"))
    assert str(base / "images" / "training" / "ADE_train_00000001.jpg") in message and "has no mask" in message


def test_a_mask_of_another_size_names_the_mask(tmp_path):
    write_folder(tmp_path)
    mask = tmp_path / "annotations" / "train" / "sub" / "scene1.png"
    save(mask, np.zeros((H, W + 1)))
    message = error(lambda: read_segmentation(tmp_path, "train"))
    assert str(mask) in message and f"{W + 1}x{H}" in message and f"{W}x{H}" in message


def test_a_label_out_of_range_names_the_mask(tmp_path):
    write_folder(tmp_path)
    mask = tmp_path / "annotations" / "train" / "sub" / "scene2.png"
    save(mask, np.full((H, W), 7))
    source = read_segmentation(tmp_path, "train")  # values are checked when a mask is loaded
    message = error(lambda: source.load_mask(mask))
    assert str(mask) in message and "label 7" in message and "3 classes" in message
    base = write_ade(tmp_path / "ade")
    save(base / "annotations" / "training" / "ADE_train_00000000.png", np.full((H, W), 151))
    source = read_segmentation(tmp_path / "ade", "train")
    assert "label 151" in error(lambda: source.load_mask(source.masks[0]))


def test_a_colour_mask_is_refused(tmp_path):
    write_folder(tmp_path)
    mask = tmp_path / "annotations" / "val" / "sub" / "scene0.png"
    save(mask, photo(3))
    source = read_segmentation(tmp_path, "val")
    message = error(lambda: source.load_mask(mask))
    assert str(mask) in message and "colour mask" in message


def test_an_empty_split_names_its_folder(tmp_path):
    base = write_ade(tmp_path, val=0)
    message = error(lambda: read_segmentation(tmp_path, "val"))
    assert str(base / "images" / "validation") in message and "empty" in message


def test_an_unknown_layout_lists_the_four(tmp_path):
    (tmp_path / "pictures").mkdir()
    message = error(lambda: read_segmentation(tmp_path, "train"))
    assert str(tmp_path) in message and all(name in message for name in ("ade20k", "voc", "cityscapes", "folder"))
    assert "does not have the voc layout" in error(lambda: read_segmentation(tmp_path, "train", "voc"))


def test_cityscapes_without_train_ids_says_how_to_make_them(tmp_path):
    write_cityscapes(tmp_path, train_ids=False)
    assert "createTrainIdLabelImgs" in error(lambda: read_segmentation(tmp_path, "train"))


def test_a_folder_without_a_class_count_asks_for_one(tmp_path):
    write_folder(tmp_path, classes=None)
    assert "--num-classes" in error(lambda: read_segmentation(tmp_path, "train"))
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["a"], "colours": []}))
    assert "colours" in error(lambda: read_segmentation(tmp_path, "train"))


def test_resize_follows_mmcv_and_opencv_rules():
    assert rescaled_size(512, 683, (2048, 512)) == (512, 683)
    assert rescaled_size(512, 683, (1024, 256)) == (256, 342)  # 341.5 rounds half up
    assert rescaled_size(1024, 2048, (2048, 512)) == (512, 1024)
    assert nearest_indices(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert nearest_indices(5, 3).tolist() == [0, 1, 3]


def test_cat_max_ratio_holds_when_a_crop_satisfying_it_exists():
    mask = np.ones((64, 256), dtype=np.uint8)
    mask[:, 80:160] = 2
    mask[:, 240:] = 2
    mask[:8] = 255  # the ignore index counts for no class

    def balanced(x: int) -> bool:
        window = mask[:, x : x + 64]
        counts = np.bincount(window[window != 255], minlength=3)
        return counts.max() / counts.sum() < 0.75

    chance = np.mean([balanced(x) for x in range(256 - 64 + 1)])  # one draw's
    for ratio, expected in ((0.75, 1 - (1 - chance) ** 10), (1.0, chance)):  # 10 draws, as mmseg; or one
        hits = np.mean([balanced(choose_crop(mask, 64, ratio, 255, np.random.default_rng(s))[1]) for s in range(300)])
        # 0.06: over 2 binomial standard deviations of 300 draws (0.027 at a one-draw chance of
        # 0.32, 0.008 at 0.98); the draws are seeded, so every machine gets the same outcome
        assert abs(hits - expected) < 0.06, (ratio, hits, expected)
    assert 1 - (1 - chance) ** 10 > 0.97 and chance < 0.4  # the redraws matter


def test_hsv_adjustment_matches_opencv_conventions():
    red = torch.tensor([255.0, 0.0, 0.0]).view(3, 1, 1)
    assert torch.allclose(adjust_hsv(red, hue=30), torch.tensor([255.0, 255.0, 0.0]).view(3, 1, 1))  # 60 degrees
    assert torch.allclose(adjust_hsv(red, saturation=0.5), torch.tensor([255.0, 127.5, 127.5]).view(3, 1, 1))
    image = torch.from_numpy(photo(5)).permute(2, 0, 1).float()
    assert torch.allclose(adjust_hsv(image), image, atol=1e-3)
    assert torch.allclose(adjust_hsv(adjust_hsv(image, hue=17), hue=-17), image, atol=1e-2)


# --- batches through DALI ---------------------------------------------------------------------------------

PALETTE = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 230]], dtype=np.uint8)


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    """A folder layout of 8 + 3 PNG scenes of 16 px blocks, each block's colour its class's."""
    root = tmp_path_factory.mktemp("blocks")
    for split, count in (("train", 8), ("val", 3)):
        for i in range(count):
            rng = np.random.default_rng([i, len(split)])
            classes = np.kron(rng.integers(0, 4, (3, 4)), np.ones((16, 16), dtype=np.int64))[:44, :60]
            save(root / "images" / split / f"{i}.png", PALETTE[classes])
            save(root / "annotations" / split / f"{i}.png", classes)
    (root / "classes.json").write_text(json.dumps({"classes": ["red", "green", "blue", "white"]}))
    return root


def colours(pixels: torch.Tensor) -> torch.Tensor:
    """Normalised [B, 3, h, w] back to 0-255."""
    return pixels * torch.tensor([255 * s for s in IMAGENET_STD]).view(3, 1, 1) + torch.tensor(
        [255 * m for m in IMAGENET_MEAN]
    ).view(3, 1, 1)


def test_training_batches_keep_image_and_mask_aligned(blocks):
    source = read_segmentation(blocks, "train")
    data = SegmentationData(source, crop=32, batch_size=4, train=True, scale=(60, 44), threads=1, photometric=False)
    assert data.steps_per_epoch == 2
    for step in range(2):
        pixels, labels = data.batch(step)
        assert pixels.shape == (4, 3, 32, 32) and pixels.dtype == torch.float32
        assert labels.shape == (4, 32, 32) and labels.dtype == torch.int64
        assert set(labels.unique().tolist()) <= {0, 1, 2, 3, 255}
        rgb = colours(pixels)
        for b in range(4):
            valid = labels[b] != 255
            assert (pixels[b][:, ~valid] == 0).all()  # padding: 0 after normalisation
            # pixels whose 5x5 neighbourhood holds one class (inside the crop's labelled part):
            # bilinear mixes no other class there, so the colour is exactly the class's
            lab = labels[b].float()[None, None]
            uniform = (torch.nn.functional.max_pool2d(lab, 5, 1, 2) == -torch.nn.functional.max_pool2d(-lab, 5, 1, 2))[
                0, 0
            ]
            inner = torch.zeros_like(valid)
            inner[2:-2, 2:-2] = True
            interior = uniform & valid & inner
            assert interior.sum() > 50
            expected = torch.from_numpy(PALETTE).float()[labels[b][interior]].T
            assert torch.allclose(rgb[b][:, interior], expected, atol=0.05)


def test_batches_are_deterministic_and_ranks_partition_a_global_batch(blocks):
    source = read_segmentation(blocks, "train")
    settings = dict(crop=24, train=True, seed=3, scale=(60, 44), threads=1)
    whole = SegmentationData(source, batch_size=4, **settings)
    again = SegmentationData(source, batch_size=4, **settings)
    shards = [SegmentationData(source, batch_size=2, rank=r, world=2, **settings) for r in (0, 1)]
    for step in (1, 2, 3):  # step 2 is the next epoch: a new order and new draws
        first, second = whole.batch(step), again.batch(step)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
        ranks = [shard.batch(step) for shard in shards]
        assert torch.equal(torch.cat([ranks[0][0], ranks[1][0]]), first[0])
        assert torch.equal(torch.cat([ranks[0][1], ranks[1][1]]), first[1])
    stream = again.stream(3)
    resumed = next(stream)
    stream.close()
    assert torch.equal(resumed[0], whole.batch(3)[0])
    other = SegmentationData(source, batch_size=4, **{**settings, "seed": 4}).batch(1)
    assert not torch.equal(other[0], whole.batch(1)[0])


def test_evaluation_yields_each_image_resized_with_labels_at_full_size(blocks):
    source = read_segmentation(blocks, "val")
    seen = {}
    for rank in (0, 1):
        data = SegmentationData(
            source, crop=32, batch_size=2, train=False, scale=(30, 22), threads=1, rank=rank, world=2
        )
        for key, pixels, labels in data.images():
            index = source.keys.index(key)
            assert pixels.shape == (1, 3, 22, 30) and labels.shape == (44, 60) and labels.dtype == torch.int64
            assert torch.equal(labels, torch.from_numpy(source.load_mask(source.masks[index])).long())
            seen[key] = rank
    assert sorted(seen) == sorted(source.keys) and seen == {"0": 0, "1": 1, "2": 0}


def test_a_training_batch_of_ade20k_holds_only_classes_and_the_ignore_index(tmp_path):
    write_ade(tmp_path, train=4)
    data = SegmentationData(
        read_segmentation(tmp_path, "train"), crop=48, batch_size=2, train=True, scale=(56, 40), threads=1
    )
    pixels, labels = data.batch(0)
    assert pixels.shape == (2, 3, 48, 48) and torch.isfinite(pixels).all()
    assert set(labels.unique().tolist()) <= {0, 6, 149, 255} and 255 in labels.unique().tolist()
    assert re.search("fewer than one batch", error(lambda: SegmentationData(data.source, 48, 8, train=True)))


@pytest.mark.gpu
def test_views_on_the_gpu_equal_the_cpu_ones(blocks, monkeypatch):
    """The per-sample ops run where DALI's decoded image is: on a GPU image they give the CPU's
    views (up to float rounding), labels page-locked on the host. (The GPU machine has no DALI:
    decoding is replaced by PIL here.)"""
    from beit.train.segment import data as segmentation_data

    monkeypatch.setattr(segmentation_data, "decode_builder", lambda threads: None)
    source = read_segmentation(blocks, "train")
    images = [torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()) for path in source.images]
    batches = {}
    for device_id in (None, 0):
        data = SegmentationData(source, crop=32, batch_size=4, train=True, scale=(60, 44), device_id=device_id)
        device = "cpu" if device_id is None else "cuda"
        data._decoded = lambda indices, device=device: [(int(i), images[i].to(device)) for i in indices]
        batches[device] = data.batch(1)
    pixels, labels = batches["cuda"]
    assert pixels.is_cuda and labels.is_pinned() and torch.equal(labels, batches["cpu"][1])
    assert torch.allclose(pixels.cpu(), batches["cpu"][0], atol=1e-3)
