"""The built-in labelled data: the shipped Fashion-MNIST subset and the official idx reader."""

import gzip

import numpy as np
from helpers import beit_here
from PIL import Image

from beit.shared.datasets.fashion_mnist import CLASSES, load


def test_the_shipped_subset_is_balanced_real_images():
    data = load()
    images, labels = data["train"]
    assert images.shape == (8000, 28, 28) and images.dtype == np.uint8
    assert np.all(np.bincount(labels, minlength=10) == 800)
    assert np.all(np.bincount(data["val"][1], minlength=10) == 200)
    assert 40 < images.mean() < 110 and images.std() > 50  # photographs of products, not noise or blanks


def test_write_an_imagefolder_at_a_chosen_size(tmp_path):
    result = beit_here("data", "fashion-mnist", tmp_path / "fm", "--size", "32", "--train", "100", "--val", "30")
    assert result.returncode == 0, result.stderr
    assert "wrote 100 training and 30 validation images" in result.stdout
    train = sorted((tmp_path / "fm" / "train").iterdir())
    assert [p.name for p in train] == sorted(CLASSES)
    assert all(len(list(p.iterdir())) == 10 for p in train)
    image = Image.open(next((tmp_path / "fm" / "val" / "bag").iterdir()))
    assert image.size == (32, 32)


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_the_official_idx_files_are_read(tmp_path):
    data = load()
    folder = tmp_path / "official"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte.gz", data["train"][0][:50])
    write_idx(folder / "train-labels-idx1-ubyte.gz", data["train"][1][:50])
    write_idx(folder / "t10k-images-idx3-ubyte.gz", data["val"][0][:20])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", data["val"][1][:20])
    back = load(folder)
    assert np.array_equal(back["train"][0], data["train"][0][:50])
    assert np.array_equal(back["val"][1], data["val"][1][:20])
    result = beit_here("data", "fashion-mnist", tmp_path / "out", "--source", folder)
    assert result.returncode == 0 and "wrote 50 training and 20 validation" in result.stdout
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    result = beit_here("data", "fashion-mnist", tmp_path / "out2", "--source", folder)
    assert result.returncode == 1 and "has no t10k-labels-idx1-ubyte" in result.stderr
