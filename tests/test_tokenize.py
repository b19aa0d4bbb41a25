"""Stage 1 end to end: real photos, real DALI CPU pipelines, real zarr stores, real subprocesses."""

import functools
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    STAGE1_SMALL,
    arrays,
    assert_same_store,
    beit_here,
    beit_torchrun,
    copy_photos,
    kill_when,
    signal_when,
)
from PIL import Image

from beit.shared.store import DONE, FAILED, PENDING, TokenStore

# Every test here makes or reads a zarr store: without zarr the module skips rather than failing to import.
zarr = pytest.importorskip("zarr")

SMALL = STAGE1_SMALL  # the `data` and `reference` fixtures (conftest.py) are made with these settings


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
    result = beit_here(*command[3:])  # the run to the end, in this process
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_store(store, reference[0])


def test_two_ranks_stopped_by_a_signal_to_one_make_the_same_store_as_one(data, reference, tmp_path):
    """Two ranks under torchrun, SIGUSR1 (the default stop_signal) to one of them once a random
    number of chunks is done: the ranks finish their chunks in flight and exit 75 (torchrun stops
    the other); the same command run again finishes the store one process makes."""
    source, tokenizer = data
    store = tmp_path / "store"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "beit", "tokenize"]
    command += [source, store, "--tokenizer", tokenizer, *SMALL]
    chunks = random.randint(1, 3)  # of 6

    def written() -> bool:
        try:
            status = zarr.open_group(str(store), mode="r")["status"][:]
        except (KeyError, OSError):  # the store is being made
            return False
        return int((status != PENDING).sum()) >= 2 * chunks

    code, stderr = signal_when(command, written, signal.SIGUSR1, worker=True)
    assert code != 0 and "exitcode  : 75" in stderr, (chunks, code, stderr[-3000:])
    assert not zarr.open_group(str(store), mode="r").attrs.get("complete")
    result = beit_torchrun(2, "tokenize", source, store, "--tokenizer", tokenizer, *SMALL, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_store(store, reference[0])


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
    result = beit_here("tokenize", listing, store, "--tokenizer", tokenizer, *SMALL, "--embed-images", "--strict")
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
    result = beit_here("store", "verify", store, "--sample", "8")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "from embedded images" in result.stdout and "100.00% of tokens" in result.stdout


def test_bad_arguments_are_one_clear_error(data, tmp_path):
    source, tokenizer = data
    result = beit_here("tokenize", source, tmp_path / "s", "--tokenizer", tokenizer, "--set", "view.image_size=96")
    assert result.returncode == 1 and "does not match the patch grid" in result.stderr
    result = beit_here("tokenize", tmp_path / "nowhere", tmp_path / "s", "--tokenizer", tokenizer)
    assert result.returncode == 1 and "neither a folder of images nor a .txt file" in result.stderr
    result = beit_here("tokenize", source, tmp_path / "s", "--tokenizer", tmp_path / "none.safetensors")
    assert result.returncode == 1 and "does not exist" in result.stderr
    result = beit_here("store", "info", tmp_path / "not-a-store")
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

    listing = beit_here("store", "info", store)  # the first 10 failures, and how to see them all
    assert listing.returncode == 0, listing.stderr
    assert f"{len(done)} done, {len(reasons)} failed, 0 pending" in listing.stdout
    shown = [line for line in listing.stdout.splitlines() if line.startswith("failed ")]
    assert len(shown) == 11 and f"and {len(reasons) - 10} more: add --failures" in shown[-1]
    listing = beit_here("store", "info", store, "--failures")
    assert listing.returncode == 0, listing.stderr
    for key, reason in reasons.items():
        assert f"failed     {key}: {reason}\n" in listing.stdout
