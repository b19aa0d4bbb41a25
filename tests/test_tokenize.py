"""Stage 1 end to end: real photos, real DALI CPU pipelines, real zarr stores, real subprocesses."""

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import COLOUR, GREY, beit, beit_torchrun, copy_photos, kill_when, save_jpeg, tiny_tokenizer
from PIL import Image

from beit.shared.store import DONE, FAILED, StoreError, TokenStore

# Every test here makes or reads a zarr store: without zarr the module skips rather than failing to import.
zarr = pytest.importorskip("zarr")

# A 64 px patch view (4x4 patches of 16) and a 32 px tokenizer view (4x4 tokens of 8).
SMALL = ["--views", "3", "--set", "view.image_size=64", "--set", "chunk_images=2", "--batch-size", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An ImageFolder tree of 12 real photos in two classes, as 120 px JPEGs, and a tokenizer."""
    root = tmp_path_factory.mktemp("data")
    source = root / "source"
    for name, names in (("colour", COLOUR[:6]), ("grey", GREY[:6])):
        for path in copy_photos(root / "raw", names):
            (source / name).mkdir(parents=True, exist_ok=True)
            save_jpeg(path, source / name / f"{path.stem}.jpg", 120)
    tokenizer = tiny_tokenizer(root / "tok.safetensors")
    return source, tokenizer


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    source, tokenizer = data
    store = tmp_path_factory.mktemp("ref") / "store"
    result = beit("tokenize", source, store, "--tokenizer", tokenizer, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    return store, result.stdout


def arrays(store: Path) -> dict:
    group = zarr.open_group(str(store), mode="r")
    return {name: group[name][:] for name in ("tokens", "views", "labels", "keys", "status", "errors")}


def assert_same_store(a: Path, b: Path) -> None:
    first, second = arrays(a), arrays(b)
    for name in first:
        assert np.array_equal(first[name], second[name]), name


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
    result = beit("store", "info", store)
    assert result.returncode == 0, result.stderr
    assert "12 done, 0 failed" in result.stdout and "grid 4x4, vocab 128" in result.stdout
    result = beit("store", "verify", store, "--sample", "6")
    assert result.returncode == 0, result.stderr
    assert "18 views of 6 images" in result.stdout and "100.00% of tokens" in result.stdout

    # a store whose tokens do not match its views is caught
    tampered = tmp_path / "tampered"
    subprocess.run(["cp", "-r", str(store), str(tampered)], check=True)
    group = zarr.open_group(str(tampered), mode="r+")
    group["tokens"][:] = (group["tokens"][:] + 1) % 128
    result = beit("store", "verify", tampered, "--sample", "4", "--tokenizer", data[1])
    assert result.returncode == 4 and "0.00% of tokens" in result.stdout


def test_rerun_is_a_no_op_and_a_different_run_is_refused(data, reference, tmp_path):
    source, tokenizer = data
    store, _ = reference
    result = beit("tokenize", source, store, "--tokenizer", tokenizer, *SMALL)
    assert result.returncode == 0 and "already complete" in result.stdout and "nothing to do" in result.stdout
    result = beit("tokenize", source, store, "--tokenizer", tokenizer, *SMALL, "--seed", "1")
    assert result.returncode == 1
    assert "store.views.seed: the store has 0, this run has 1" in result.stderr and "--overwrite" in result.stderr
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(store), str(copy)], check=True)
    result = beit("tokenize", source, copy, "--tokenizer", tokenizer, *SMALL, "--seed", "1", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert TokenStore.open(copy).attrs["views"]["seed"] == 1
    assert not np.array_equal(arrays(copy)["views"], arrays(store)["views"])


def test_resume_after_sigkill_at_several_points_equals_an_uninterrupted_run(data, reference, tmp_path):
    source, tokenizer = data
    store = tmp_path / "store"
    command = [sys.executable, "-m", "beit", "tokenize", str(source), str(store), "--tokenizer", str(tokenizer), *SMALL]

    def reached(kill_after: int) -> bool:  # 0: the store exists; n: n status chunks are written
        if kill_after == 0:
            return (store / "zarr.json").exists()
        folder = store / "status" / "c"
        return folder.exists() and len(list(folder.iterdir())) >= kill_after

    for kill_after in (0, 2, 4):  # during start-up / creation, then after 2 and 4 of 6 chunks
        kill_when(command, functools.partial(reached, kill_after), timeout=120)
    assert not TokenStore.open(store, require_complete=False).attrs.get("complete")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_store(store, reference[0])


def test_two_ranks_make_the_same_store_as_one(data, reference, tmp_path):
    source, tokenizer = data
    store = tmp_path / "store"
    result = beit_torchrun(2, "tokenize", source, store, "--tokenizer", tokenizer, *SMALL, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_store(store, reference[0])


def test_a_store_at_an_fsspec_url(data, reference, tmp_path):
    source, tokenizer = data
    url = f"file://{tmp_path}/remote/store"
    result = beit("tokenize", source, url, "--tokenizer", tokenizer, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_store(tmp_path / "remote" / "store", reference[0])
    assert (tmp_path / "remote" / "store.metrics.json").exists()
    result = beit("store", "verify", url, "--sample", "3")
    assert result.returncode == 0 and "100.00% of tokens" in result.stdout


def exif_rotated_jpeg(path: Path) -> None:
    """A 48x96 (w x h) JPEG whose EXIF says 'rotate 90 degrees clockwise' (orientation 6)."""
    image = Image.new("RGB", (48, 96), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes(), quality=90)


def test_odd_and_bad_images(data, tmp_path):
    _, tokenizer = data
    photo = Image.open(copy_photos(tmp_path / "raw", ["astronaut.png"])[0]).convert("RGB").resize((96, 96))
    folder = tmp_path / "odd"
    folder.mkdir()
    photo.convert("L").save(folder / "grey.jpg")
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    photo.convert("P").save(folder / "palette.png")
    photo.convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257).save(folder / "sixteen.png")
    exif_rotated_jpeg(folder / "rotated.jpg")
    photo.resize((8, 8)).save(folder / "tiny.png")
    photo.resize((12000, 9000), Image.NEAREST).save(folder / "huge.jpg", quality=80)
    (folder / "truncated.jpg").write_bytes((folder / "grey.jpg").read_bytes()[:400])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not a picture")
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"odd/{p.name}\n" for p in sorted(folder.iterdir())) + "odd/missing.jpg\n")

    store = tmp_path / "store"
    result = beit("tokenize", listing, store, "--tokenizer", tokenizer, *SMALL, "--embed-images", "--strict")
    assert result.returncode == 3, result.stderr[-3000:]  # --strict: failures make it exit non-zero
    assert "tokenized 8 of 12 images" in result.stdout and "4 failed" in result.stdout
    a = arrays(store)
    status = dict(zip(a["keys"], a["status"], strict=True))
    errors = dict(zip(a["keys"], a["errors"], strict=True))
    for name in (
        "grey.jpg",
        "cmyk.jpg",
        "palette.png",
        "rgba.png",
        "sixteen.png",
        "rotated.jpg",
        "tiny.png",
        "huge.jpg",
    ):
        assert status[f"odd/{name}"] == DONE, (name, errors[f"odd/{name}"])
    assert errors["odd/empty.jpg"] == "empty file"
    assert "truncated" in errors["odd/truncated.jpg"]
    assert "not an image" in errors["odd/text.png"]
    assert "unreadable" in errors["odd/missing.jpg"]
    assert all(status[k] == FAILED for k in ("odd/empty.jpg", "odd/truncated.jpg", "odd/text.png", "odd/missing.jpg"))
    # EXIF orientation is applied: the views of the 48x96 (portrait) file lie in a 96x48 landscape image
    views = a["views"][list(a["keys"]).index("odd/rotated.jpg")]
    assert np.all(views[:, 0] + views[:, 2] <= 96) and np.all(views[:, 1] + views[:, 3] <= 48)
    assert np.any(views[:, 2] > 48)
    huge = a["views"][list(a["keys"]).index("odd/huge.jpg")]
    assert np.all(huge[:, 0] + huge[:, 2] <= 12000) and np.all(huge[:, 1] + huge[:, 3] <= 9000)
    # each image's (height, width) after EXIF orientation is recorded, so stage 2 never reads headers; (0, 0) if failed
    sizes = dict(zip(a["keys"], map(tuple, TokenStore.open(store).image_sizes()), strict=True))
    assert sizes["odd/rotated.jpg"] == (48, 96) and sizes["odd/huge.jpg"] == (9000, 12000)
    assert sizes["odd/grey.jpg"] == (96, 96) and sizes["odd/tiny.png"] == (8, 8) and sizes["odd/empty.jpg"] == (0, 0)
    # the embedded copies are sharded a chunk of images per shard, one image per inner chunk: read one at a time
    images = zarr.open_group(str(store), mode="r")["images"]
    assert images.chunks == (1,) and images.shards == (2,)
    # embedded images make the store self-contained: verify reads them, not the files
    for path in folder.iterdir():
        path.unlink()
    result = beit("store", "verify", store, "--sample", "8")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "from embedded images" in result.stdout and "100.00% of tokens" in result.stdout


def test_bad_arguments_are_one_clear_error(data, tmp_path):
    source, tokenizer = data
    result = beit("tokenize", source, tmp_path / "s", "--tokenizer", tokenizer, "--set", "view.image_size=96")
    assert result.returncode == 1 and "does not match the patch grid" in result.stderr
    result = beit("tokenize", tmp_path / "nowhere", tmp_path / "s", "--tokenizer", tokenizer)
    assert result.returncode == 1 and "neither a folder of images nor a .txt file" in result.stderr
    result = beit("tokenize", source, tmp_path / "s", "--tokenizer", tmp_path / "none.safetensors")
    assert result.returncode == 1 and "does not exist" in result.stderr
    result = beit("store", "info", tmp_path / "not-a-store")
    assert result.returncode == 1 and "not a token store" in result.stderr


def _without_file_permission_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the capability
    bounding set, so that root, too, is refused a file or folder of mode 000 (tests run as root)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "cannot drop a capability")


def _permissions_hold(locked: Path) -> bool:
    """Whether a child of this test (after `_without_file_permission_override`) is refused `locked`."""
    if os.geteuid() != 0:
        return True
    try:
        probe = subprocess.run(
            [sys.executable, "-S", "-c", f"open({str(locked)!r}, 'rb')"],
            preexec_fn=_without_file_permission_override,
            capture_output=True,
        )
    except subprocess.SubprocessError:  # no CAP_SETPCAP (a container that forbids it)
        return False
    return probe.returncode != 0 and b"PermissionError" in probe.stderr


def test_every_entry_named_like_an_image_is_listed_done_or_failed_with_its_reason(data, tmp_path):
    source, tokenizer = data
    folder = tmp_path / "photos"
    folder.mkdir()
    photos = sorted(source.rglob("*.jpg"))
    for path in photos[:3]:
        shutil.copy(path, folder / path.name)
    (folder / "link.jpg").symlink_to(folder / photos[0].name)  # a link to a photo is a photo
    (folder / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    (folder / "holiday.jpg").mkdir()
    os.mkfifo(folder / "pipe.png")
    for i in range(6):
        Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(folder / f"anim{i}.gif")
    (folder / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(16))
    (folder / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (folder / "notes.txt").write_text("side files are not images")
    (folder / "meta.json").write_text("{}")
    locked = folder / "locked.jpg"
    shutil.copy(photos[3], locked)
    (folder / "private").mkdir()
    shutil.copy(photos[4], folder / "private" / "hidden.jpg")
    locked.chmod(0)
    (folder / "private").chmod(0)
    permissions = _permissions_hold(locked)
    if not permissions:  # they could not be tested here
        locked.chmod(0o644)
        (folder / "private").chmod(0o755)

    store = tmp_path / "store"
    command = [sys.executable, "-m", "beit", "tokenize", folder, store, "--tokenizer", tokenizer, *SMALL]
    result = subprocess.run(
        [*map(str, command)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_without_file_permission_override if os.geteuid() == 0 and permissions else None,
    )
    (folder / "private").chmod(0o755)
    assert result.returncode == 0, result.stderr[-3000:]
    reasons = {
        "broken.jpg": f"broken symbolic link (to {tmp_path / 'gone.jpg'})",
        "holiday.jpg": "is a folder, not a file",
        "pipe.png": "not a regular file (a pipe, socket or device)",
        "phone.heic": "unsupported format (.heic): convert it to JPEG or PNG",
        "logo.svg": "unsupported format (.svg): convert it to JPEG or PNG",
        **{f"anim{i}.gif": "unsupported format (.gif): convert it to JPEG or PNG" for i in range(6)},
    }
    done = [path.name for path in photos[:3]] + ["link.jpg"]
    if permissions:
        reasons["locked.jpg"] = "permission denied"
        reasons["private"] = "permission denied: a folder whose images cannot be listed"
    else:
        done += ["locked.jpg", "private/hidden.jpg"]
    a = arrays(store)
    assert sorted(a["keys"]) == sorted([*done, *reasons])  # every entry, and no side file
    for key, status, error in zip(a["keys"], a["status"], a["errors"], strict=True):
        assert (status, error) == ((DONE, "") if key in done else (FAILED, reasons[key])), key

    listing = beit("store", "info", store)  # the first 10 failures, and how to see them all
    assert listing.returncode == 0, listing.stderr
    assert f"{len(done)} done, {len(reasons)} failed, 0 pending" in listing.stdout
    shown = [line for line in listing.stdout.splitlines() if line.startswith("failed ")]
    assert len(shown) == 11 and f"and {len(reasons) - 10} more: add --failures" in shown[-1]
    listing = beit("store", "info", store, "--failures")
    assert listing.returncode == 0, listing.stderr
    for key, reason in reasons.items():
        assert f"failed     {key}: {reason}\n" in listing.stdout


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
        result = beit("tokenize", source, tmp_path / name, "--tokenizer", data[1], *SMALL, *extra)
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


NODE_COPY = """
import sys
import numpy as np
from beit.shared.store import TokenStore
copy = TokenStore.open(sys.argv[1]).node_copy(sys.argv[2])
print(copy.folder, int(np.asarray(copy.tokens, dtype=np.int64).sum()), len(copy.keys), copy.keys[len(copy.keys) - 1])
"""


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
