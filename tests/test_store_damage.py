"""Silent corruption of a store: every chunk carries a crc32c checksum, so a chunk changed on disk
is an error naming the array and the images it holds (never other tokens used quietly);
`beit store verify --full` lists every damaged chunk; running the same `beit tokenize` command
again redoes just those chunks (or rewrites a damaged listing chunk from the source) and gives
the undamaged store back. Stores made before checksums still open. Real stores on disk, real
bytes flipped in their chunk files."""

import shutil

import numpy as np
import pytest
from helpers import STAGE1_SMALL, arrays, assert_same_store, beit_here

from beit.shared.store import StoreError, TokenStore

zarr = pytest.importorskip("zarr")


def flip(path, offset: int = -5) -> None:
    """Change one byte of a file, as a bad disk or a partial copy does (the last bytes of a chunk
    file are its checksum; a byte before them is its data)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.fixture
def damaged(reference, tmp_path):
    """A copy of the session's reference store (12 images, chunks of 2) with the tokens of
    images 2-3 and the keys chunk (all 12, 16 work chunks a listing chunk) changed on disk."""
    store = shutil.copytree(reference[0], tmp_path / "store")
    flip(store / "tokens" / "c" / "1" / "0" / "0" / "0")
    flip(store / "keys" / "c" / "0", offset=-6)
    return store


def test_a_changed_chunk_is_named_listed_by_verify_full_and_redone_by_tokenize(data, reference, damaged):
    source, tokenizer = data
    store = TokenStore.open(damaged)
    assert store.has_checksums
    assert [(d["array"], d["start"], d["stop"]) for d in store.damaged()] == [("tokens", 2, 4), ("keys", 0, 12)]
    with pytest.raises(StoreError, match=r"the chunk of tokens holding images 2-3 is damaged \(its crc32c checksum"):
        store.tokens(np.array([0, 3]))
    assert store.tokens(np.array([0, 1, 4])).shape[0] == 3  # the other chunks read as ever

    result = beit_here("store", "verify", damaged, "--full")
    assert result.returncode == 5, result.stderr[-2000:]
    assert "2 damaged" in result.stdout and "tokens, images 2-3: its crc32c checksum does not match" in result.stdout
    assert "keys, images 0-11" in result.stdout

    result = beit_here("pretrain", damaged, "--out", damaged.parent / "run", "--model", "tiny", "--epochs", 1)
    assert result.returncode == 1 and "is damaged" in result.stderr and "beit store verify --full" in result.stderr

    result = beit_here("tokenize", source, damaged, "--tokenizer", tokenizer, *STAGE1_SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokens holding images 2-3 was damaged" in result.stdout and "keys holding images 0-11" in result.stdout
    assert_same_store(reference[0], damaged)
    assert TokenStore.open(damaged).complete
    assert beit_here("store", "verify", damaged, "--full", "--sample", 4).returncode == 0


def test_a_store_made_before_checksums_still_opens_and_verify_full_says_what_it_can_find(reference, tmp_path):
    """The same store written with the codecs stores had before checksums (no crc32c)."""
    store = shutil.copytree(reference[0], tmp_path / "old")
    group = zarr.open_group(str(store), mode="r+")
    for name, values in arrays(store).items():
        old = group[name]
        codecs = dict(compressors=[zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")])
        options = codecs if name == "tokens" else {}
        fill = old.fill_value if name not in ("keys", "errors") else None
        del group[name]
        group.create_array(name, shape=values.shape, chunks=old.chunks, dtype=old.dtype, fill_value=fill, **options)
        group[name][:] = values
    group.attrs.pop("checksums", None)
    opened = TokenStore.open(store)
    assert not opened.has_checksums and opened.damaged() == []
    assert np.array_equal(opened.tokens(), TokenStore.open(reference[0]).tokens())
    result = beit_here("store", "verify", store, "--full", "--sample", 4)
    assert result.returncode == 0 and "made before chunk checksums" in result.stdout, result.stderr[-2000:]
