"""The token store, the contract between the stages: what it records and answers, how a second run
of stage 1 finishes it or is refused, a store at a URL, the image bytes it gives, `store info` and
`store verify`, and the node-local copy stage 2 maps. Real stores made by `beit tokenize`."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import STAGE1_SMALL, arrays, assert_same_store, beit_here
from PIL import Image

from beit.shared.store import DONE, StoreError, TokenStore

# Every test here makes or reads a zarr store: without zarr the module skips rather than failing to import.
zarr = pytest.importorskip("zarr")

SMALL = STAGE1_SMALL  # the `data` and `reference` fixtures (conftest.py) are made with these settings


NODE_COPY = """
import sys
import numpy as np
from beit.shared.store import TokenStore
copy = TokenStore.open(sys.argv[1]).node_copy(sys.argv[2])
print(copy.folder, int(np.asarray(copy.tokens, dtype=np.int64).sum()), len(copy.keys), copy.keys[len(copy.keys) - 1])
"""


def test_the_store_says_what_it_is(data, reference):
    source, tokenizer = data
    store, stdout = reference
    assert "tokenized 12 of 12 images x 3 views" in stdout
    opened = TokenStore.open(store)
    attrs = opened.attrs
    assert attrs["format"] == "beit-token-store" and attrs["version"] == 1 and attrs["complete"] is True
    assert attrs["tokenizer"]["sha256"] and attrs["tokenizer"]["vocab_size"] == 128
    assert attrs["tokenizer"]["grid"] == [4, 4] and attrs["grid"] == [4, 4]
    assert attrs["views"]["count"] == 3 and attrs["views"]["seed"] == 0
    assert attrs["views"]["params"] == ["x", "y", "w", "h", "flip", "brightness", "contrast", "saturation"]
    assert attrs["views"]["config"]["image_size"] == 64 and attrs["views"]["config"]["tokenizer_size"] == 32
    assert "after crop and resize" in attrs["views"]["jitter"]
    assert attrs["source"]["kind"] == "imagefolder" and len(attrs["source"]["fingerprint"]) == 64
    assert attrs["class_names"] == ["colour", "grey"]
    assert attrs["counts"] == {"images": 12, "done": 12, "failed": 0}
    a = arrays(store)
    assert a["tokens"].shape == (12, 3, 4, 4) and a["tokens"].dtype == np.uint16
    assert list(a["labels"]) == [0] * 6 + [1] * 6
    assert a["keys"][0].startswith("colour/") and a["keys"][-1].startswith("grey/")
    assert np.all(a["status"] == DONE)
    views = a["views"]
    for i, key in enumerate(a["keys"]):
        width, height = Image.open(source / key).size
        x, y, w, h = views[i, :, 0], views[i, :, 1], views[i, :, 2], views[i, :, 3]
        assert np.all((x >= 0) & (y >= 0) & (x + w <= width) & (y + h <= height) & (w > 0) & (h > 0))
    assert set(np.unique(views[..., 4])) <= {0.0, 1.0}
    assert np.all((views[..., 5:] >= 0.6) & (views[..., 5:] <= 1.4))
    assert len(np.unique(a["tokens"])) > 8  # the tokenizer is not degenerate
    metrics = json.loads(Path(f"{store}.metrics.json").read_text())
    assert metrics["done"] == 12 and metrics["views_per_s"] > 0 and set(metrics["time"]) >= {"encoder", "write"}


def test_info_and_verify(reference, data, tmp_path):
    store, _ = reference
    result = beit_here("store", "info", store)
    assert result.returncode == 0, result.stderr
    assert "12 done, 0 failed" in result.stdout and "grid 4x4, vocab 128" in result.stdout
    result = beit_here("store", "verify", store, "--sample", "6")
    assert result.returncode == 0, result.stderr
    assert "18 views of 6 images" in result.stdout and "100.00% of tokens" in result.stdout

    # a store whose tokens do not match its views is caught
    tampered = tmp_path / "tampered"
    subprocess.run(["cp", "-r", str(store), str(tampered)], check=True)
    group = zarr.open_group(str(tampered), mode="r+")
    group["tokens"][:] = (group["tokens"][:] + 1) % 128
    result = beit_here("store", "verify", tampered, "--sample", "4", "--tokenizer", data[1])
    assert result.returncode == 4 and "0.00% of tokens" in result.stdout


def test_rerun_is_a_no_op_and_a_different_run_is_refused(data, reference, tmp_path):
    source, tokenizer = data
    store, _ = reference
    result = beit_here("tokenize", source, store, "--tokenizer", tokenizer, *SMALL)
    assert result.returncode == 0 and "already complete" in result.stdout and "nothing to do" in result.stdout
    result = beit_here("tokenize", source, store, "--tokenizer", tokenizer, *SMALL, "--seed", "1")
    assert result.returncode == 1
    assert "store.views.seed: the store has 0, this run has 1" in result.stderr and "--overwrite" in result.stderr
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(store), str(copy)], check=True)
    result = beit_here("tokenize", source, copy, "--tokenizer", tokenizer, *SMALL, "--seed", "1", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert TokenStore.open(copy).attrs["views"]["seed"] == 1
    assert not np.array_equal(arrays(copy)["views"], arrays(store)["views"])


def test_a_store_at_an_fsspec_url(data, reference, tmp_path):
    source, tokenizer = data
    url = f"file://{tmp_path}/remote/store"
    result = beit_here("tokenize", source, url, "--tokenizer", tokenizer, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_store(tmp_path / "remote" / "store", reference[0])
    assert (tmp_path / "remote" / "store.metrics.json").exists()
    result = beit_here("store", "verify", url, "--sample", "3")
    assert result.returncode == 0 and "100.00% of tokens" in result.stdout


def test_the_fingerprint_of_a_source_of_images_alone_is_what_older_stores_recorded(data, reference):
    """sha256 over the sorted relative paths and sizes of the image files: a store made before
    unreadable entries were listed must still be accepted by the same command."""
    source, _ = data
    digest = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.suffix == ".jpg"):
        digest.update(f"{path.relative_to(source).as_posix()}\t{path.stat().st_size}\n".encode())
    assert TokenStore.open(reference[0]).attrs["source"]["fingerprint"] == digest.hexdigest()


def test_the_store_answers_for_its_layout_and_gives_each_image_by_one_rule(data, reference, tmp_path):
    """TokenStore's typed accessors agree with its arrays and attributes; an image's bytes are the
    store's embedded copy when it holds one (even after the source changed), else the source file."""
    store = TokenStore.open(reference[0])
    a, attrs = arrays(reference[0]), store.attrs
    assert (store.vocab_size, store.tokenizer_size, store.image_size, store.view_seed) == (128, 32, 64, 0)
    assert store.view_config.image_size == 64 and store.view_config.scale == (0.08, 1.0)
    assert store.tokenizer_sha256 == attrs["tokenizer"]["sha256"] and store.complete
    assert store.source_fingerprint == attrs["source"]["fingerprint"] and store.class_names == ["colour", "grey"]
    assert store.keys() == list(a["keys"]) and np.array_equal(store.labels(), a["labels"])
    assert np.array_equal(store.view_params(), a["views"]) and np.array_equal(store.tokens(), a["tokens"])
    assert np.array_equal(store.tokens(np.array([3, 7])), a["tokens"][[3, 7]])
    assert store.items([5]) == [data[0] / a["keys"][5]] and not store.has_embedded_images
    cpu = {"body": "fp32", "tf32": False, "device": "cpu"}  # how the tokenizer ran, for verify and online targets
    assert store.tokenizer_precision == cpu or __import__("torch").cuda.is_available()

    source = tmp_path / "source"
    shutil.copytree(data[0], source)
    for name, extra in (("embedded", ["--embed-images"]), ("plain", [])):
        result = beit_here("tokenize", source, tmp_path / name, "--tokenizer", data[1], *SMALL, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    original = (source / a["keys"][2]).read_bytes()
    (source / a["keys"][2]).write_bytes((source / a["keys"][9]).read_bytes())  # the source changes
    (source / a["keys"][4]).unlink()
    embedded = TokenStore.open(tmp_path / "embedded")
    assert embedded.items([2, 4]) == [original, embedded.items([4])[0]]
    assert embedded.items([4, 2])[1] == original
    embedded.check_sources(np.arange(12))  # a store with its own copies needs no source
    plain = TokenStore.open(tmp_path / "plain")
    assert plain.items([2]) == [source / a["keys"][2]]
    with pytest.raises(
        StoreError, match=rf"source file {re.escape(str(source / a['keys'][4]))} is gone .*--embed-images\.$"
    ):
        plain.check_sources(np.arange(12))


def test_the_node_copy_is_written_once_and_mapped_by_every_process(reference, tmp_path):
    """Stage 2's arrays come from one node-local copy of the store: four processes asking at once
    get the same folder, written once (a lock), equal to the store; a later run maps it as it is."""
    cache = tmp_path / "cache"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", NODE_COPY, str(reference[0]), str(cache)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outputs = {run.communicate(timeout=300)[0] for run in runs}
    assert all(run.returncode == 0 for run in runs) and len(outputs) == 1, outputs
    folders = sorted(cache.iterdir())
    assert [p.name for p in folders if p.is_dir()] == [outputs.pop().split()[0].rsplit("/", 1)[1]]  # no leftovers
    store = TokenStore.open(reference[0])
    copy = store.node_copy(cache)
    assert np.array_equal(copy.tokens, store.tokens()) and np.array_equal(copy.views, store.view_params())
    assert np.array_equal(copy.status, store.status()) and np.array_equal(copy.sizes, store.image_sizes())
    assert [copy.keys[i] for i in range(len(copy.keys))] == store.keys()
    assert isinstance(copy.tokens, np.memmap) and isinstance(copy.keys.blob, np.memmap)
    written = (copy.folder / "tokens.npy").stat().st_mtime_ns
    assert store.items([3]) == [store.source_root / store.keys()[3]]  # the rule reads the keys from the table
    assert TokenStore.open(reference[0]).node_copy(cache).folder == copy.folder
    assert (copy.folder / "tokens.npy").stat().st_mtime_ns == written
    (tmp_path / "file").write_text("")  # a cache folder that cannot be made: one sentence naming the setting
    with pytest.raises(StoreError, match=r"cannot write the node's copy of .* set data_cache to a writable local"):
        TokenStore.open(reference[0]).node_copy(tmp_path / "file" / "below")
