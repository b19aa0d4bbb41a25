"""Webdataset-style tar shards as a source: the same images as a folder give the same store,
pre-training reads either, a sample without an image is recorded as failed, bad shards are one
sentence."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import COLOUR, GREY, beit_here, copy_photos, save_jpeg, tiny_tokenizer

from beit.shared.store import DONE, FAILED, TokenStore

pytest.importorskip("zarr")

SMALL = ["--views", "2", "--set", "view.image_size=64", "--set", "chunk_images=4", "--batch-size", "4"]
PRETRAIN = [
    "--model", "tiny", "--set", "model.width=64", "--set", "model.heads=2", "--set", "model.depth=2",
    "--batch-size", "4", "--lr", "1e-3", "--warmup-epochs", "1", "--epochs", "2",
]  # fmt: skip


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 photos as a flat folder, and the same files in three shards of four samples each
    (image + class), in the folder's sorted order; a tokenizer."""
    root = tmp_path_factory.mktemp("shards")
    folder = root / "folder"
    folder.mkdir()
    for path in copy_photos(root / "raw", COLOUR[:6] + GREY[:6]):
        save_jpeg(path, folder / f"{path.stem}.jpg", 96)
    files = sorted(folder.iterdir())
    for s in range(3):
        with tarfile.open(root / f"shards-{s:06d}.tar", "w") as tar:
            for path in files[4 * s : 4 * s + 4]:
                add(tar, path.name, path.read_bytes())
                add(tar, f"{path.stem}.cls", str(int(path.stem < "d")).encode())
    return root, folder, tiny_tokenizer(root / "tok.safetensors")


def test_shards_and_a_folder_of_the_same_images_make_the_same_store(data, tmp_path):
    root, folder, tokenizer = data
    shards = f"{root}/shards-{{000000..000002}}.tar"
    result = beit_here("tokenize", shards, tmp_path / "from-shards", "--tokenizer", tokenizer, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert beit_here("tokenize", folder, tmp_path / "from-folder", "--tokenizer", tokenizer, *SMALL).returncode == 0
    a, b = TokenStore.open(tmp_path / "from-shards"), TokenStore.open(tmp_path / "from-folder")
    assert a.keys()[:2] == ["shards-000000.tar/astronaut.jpg", "shards-000000.tar/brick.jpg"]
    assert [k.split("/")[1] for k in a.keys()] == b.keys()
    for name in ("tokens", "view_params", "status", "image_sizes"):
        assert np.array_equal(getattr(a, name)(), getattr(b, name)()), name
    assert list(a.labels()) == [int(k.split("/")[1] < "d") for k in a.keys()]  # from the .cls members
    assert a.source_record["kind"] == "shards" and a.items([1])[0].size == (folder / "brick.jpg").stat().st_size
    for store in ("from-shards", "from-folder"):  # pre-training reads either (the shards by ranged reads)
        result = beit_here("pretrain", tmp_path / store, "--out", tmp_path / f"run-{store}", *PRETRAIN)
        assert result.returncode == 0, result.stderr[-3000:]
    verify = beit_here("store", "verify", tmp_path / "from-shards", "--sample", "6")
    assert verify.returncode == 0 and "100.00% of tokens" in verify.stdout, verify.stdout + verify.stderr


def test_a_sample_without_an_image_is_recorded_and_bad_shards_are_one_sentence(data, tmp_path):
    root, folder, tokenizer = data
    odd = tmp_path / "odd.tar"
    with tarfile.open(odd, "w") as tar:
        add(tar, "one.jpg", (folder / "coffee.jpg").read_bytes())
        add(tar, "one.cls", b"1")
        add(tar, "two.cls", b"0")  # a sample with a class and no image
        add(tar, "three.jpg", b"")  # an empty image
    result = beit_here("tokenize", odd, tmp_path / "store", "--tokenizer", tokenizer, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    store = TokenStore.open(tmp_path / "store")
    assert store.keys() == ["odd.tar/one.jpg", "odd.tar/two", "odd.tar/three.jpg"]
    assert list(store.status()) == [DONE, FAILED, FAILED] and list(store.labels()) == [1, 0, -1]
    assert dict(store.failures()) == {
        "odd.tar/two": "the sample has no image (no member named like one)",
        "odd.tar/three.jpg": "empty file",
    }
    missing = f"{root}/shards-{{000000..000003}}.tar"  # one shard more than there are
    result = beit_here("tokenize", missing, tmp_path / "x", "--tokenizer", tokenizer, *SMALL)
    assert result.returncode == 1 and f"{root}/shards-000003.tar does not exist" in result.stderr
    broken = tmp_path / "broken.tar"
    broken.write_bytes(Path(root / "shards-000000.tar").read_bytes()[:700])  # cut inside a member
    result = beit_here("tokenize", broken, tmp_path / "y", "--tokenizer", tokenizer, *SMALL)
    assert result.returncode == 1 and f"{broken} is not a readable tar file" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
