"""The token store: what `beit tokenize` writes and `beit pretrain` reads. Zarr v3, format 1.

One Zarr group per tokenization, N images with V views each and a gh x gw token grid:

    tokens   uint16  [N, V, gh, gw]   the tokenizer's argmax for each view
    views    float32 [N, V, 8]        each view's parameters, in the order of `views.PARAMS`:
                                      x, y, w, h (crop box in source pixels, after EXIF
                                      orientation), flip, brightness, contrast, saturation
    labels   int32   [N]              class index, -1 = none
    keys     string  [N]              the image's path relative to the source root (or as listed);
                                      every entry of a folder named like an image, readable or not
    status   uint8   [N]              0 pending, 1 done, 2 failed
    errors   string  [N]              why a failed image failed ("" otherwise)
    sizes    int32   [N, 2]           each image's (height, width) after EXIF orientation (0, 0
                                      for a failed one); stores made before it lack it
    members  int64   [N, 2]           a source of tar shards only: each image's (offset, size) in
                                      its shard (the key is shard/member; -1 for a sample without one)
    images   bytes   [N]              optional (--embed-images): the source file, so the store
                                      is self-contained; sharded (a shard per chunk of images,
                                      an inner chunk per image) so one image is read alone

Every chunk of every array ends in a crc32c checksum (zarr v3's codec; the attribute `checksums`
says so; stores made before it have none and still open): a chunk changed on disk is an error
naming the array and its images (`TokenStore.damaged`, `repair`), never other values.

All arrays are chunked along N in chunks of `chunk_images` images, the unit of work: one writer
(rank) owns a whole chunk, writes its tokens, views, errors (and images), and its status last.
`keys` and `labels`, written once when the store is made, are chunked 16 work chunks at a time.
A chunk whose status is not all done/failed is pending and is done again on resume; the views
are a pure function of (seed, image, view) and so come out the same.

Group attributes (everything needed to know what a store is without the command that made it):

    format "beit-token-store", version 1, writer ("beit X.Y.Z"), created (UTC ISO time)
    tokenizer   {kind, sha256 (of the encoder's weights and architecture, `dvae.encoder_sha256`),
                 vocab_size, input_size, grid, downsample, arch}
    views       {count V, seed, config (ViewConfig), params, jitter, renderer}
    source      {kind, images, fingerprint (sha256 of sorted relative paths and sizes), classes}
    source_root, tokenizer_path     where the images and the tokenizer were (hints for verify)
    tokenizer_precision   {body, tf32, device}: how the tokenizer ran (`dvae.Precision`)
    class_names [...]
    chunk_images (images per chunk: the configured chunk_images, or N when N is smaller),
    grid [gh, gw], counts {images, done, failed} (when complete), checksums "crc32c" (new stores)
    complete    true, written last

`TokenStore.open` refuses a store of another format or version, or an incomplete one, naming
both sides. For training, `node_copy` writes tokens, view parameters, status, image sizes and
keys once per node into a local cache folder as plain arrays, and every rank of the node maps
them (random zarr reads are far slower, and a copy per rank is 8x the memory): the node holds
them once, in its page cache, and a rank's private memory stays small.

This module is the only reader of the layout: the rest of beit asks `TokenStore` for what it
records (typed properties: tokenizer identity, view config, source fingerprint, class names)
and holds (`tokens`, `view_params`, `labels`, `keys`), and for the bytes to decode for an image
(`items`), by one rule: the embedded copy when the store holds one, else the original file.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from beit.shared.config import differences
from beit.shared.images import TarMember, exists, is_url, join, read_source
from beit.shared.object_storage import ObjectStorageError, retrying_store
from beit.shared.space import no_room, out_of_space

if TYPE_CHECKING:
    from beit.shared.node_copy import KeyTable, NodeCopy

FORMAT = "beit-token-store"
VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2
LISTING_CHUNKS = 16  # work chunks per zarr chunk of `keys` and `labels` (written once, by rank 0)
CHECKSUMS = "crc32c"  # what every chunk of a new store carries (zarr v3's crc32c codec, last)
WORK_ARRAYS = ("tokens", "views", "status", "errors", "sizes", "images")  # written whole per work chunk
LISTING_ARRAYS = ("keys", "labels", "members")  # written once, from the source's listing


class StoreError(ValueError):
    """A store that cannot be used as asked; the message names the difference and the fix."""


def _zarr():
    import zarr

    warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
    return zarr


def _open_group(location: str, mode: str):
    """zarr.open_group for a local path or an fsspec URL (file:// gets its folders made; object
    storage's reads and writes are tried again, `object_storage.retrying_store`)."""
    zarr = _zarr()
    if location.startswith("file://"):
        return zarr.open_group(location, mode=mode, storage_options={"auto_mkdir": True})
    if is_url(location):
        return zarr.open_group(retrying_store(location, read_only=mode == "r"), mode=mode)
    return zarr.open_group(location, mode=mode)


def chunk_length(chunk_images: int, images: int) -> int:
    """The images per chunk of a store of `images` images made with `chunk_images`: a store smaller
    than one chunk is one chunk of all its images. This is what the store records as `chunk_images`
    and what a run to finish it must agree with."""
    return min(chunk_images, max(images, 1))


def refuse_another(location: str, attrs: dict, identity: dict, chunk_images: int, images: int) -> None:
    """Refuse, in one sentence, to finish a store that is not ours or was made differently."""
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{location} exists and is not a beit token store: choose another path, or --overwrite.")
    stored = {k: attrs.get(k) for k in identity}
    diffs = [
        f"{key}: the store has {theirs!r}, this run has {ours!r}"
        for key, theirs, ours in differences(stored, json.loads(json.dumps(identity)), "store")
    ]
    wanted = chunk_length(chunk_images, images)
    if attrs.get("chunk_images") != wanted:
        diffs.append(
            f"store.chunk_images: the store has {attrs.get('chunk_images')}, this run has {wanted}"
            + (f" (chunk_images {chunk_images}, {images} images)" if wanted != chunk_images else "")
        )
    if diffs:
        raise StoreError(
            f"{location} was made differently ({'; '.join(diffs[:3])}"
            + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
            + "): use another STORE path, or --overwrite to replace it."
        )


def create(location: str, identity: dict, keys, labels, class_names, chunk_images: int, embed_images: bool, members):
    """A new store's group: its arrays (keys, labels and tar members written), marked as being
    created until its attributes are written, last."""
    zarr = _zarr()
    n = len(keys)
    group = _open_group(location, "w")
    group.update_attributes({"format": FORMAT, "version": VERSION, "creating": True})
    gh, gw = identity["grid"]
    views = identity["views"]["count"]
    chunk = (chunk_length(chunk_images, n),)
    # every chunk ends in a crc32c checksum: a chunk changed on disk is an error, never other tokens
    crc = zarr.codecs.Crc32cCodec()
    plain = dict(compressors=[zarr.codecs.ZstdCodec(level=0), crc])  # zarr's default compression, checked
    blosc = zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    group.create_array(
        "tokens", shape=(n, views, gh, gw), chunks=chunk + (views, gh, gw), dtype="uint16", fill_value=0,
        compressors=[blosc, crc],
    )  # fmt: skip
    group.create_array(
        "views", shape=(n, views, 8), chunks=chunk + (views, 8), dtype="float32", fill_value=0.0, **plain
    )
    # keys and labels are written once, here: 16 work chunks a zarr chunk (a tenth of the files to write)
    listing = (min(n, chunk[0] * LISTING_CHUNKS),) if n else chunk
    group.create_array("labels", shape=(n,), chunks=listing, dtype="int32", fill_value=-1, **plain)
    group.create_array("keys", shape=(n,), chunks=listing, dtype=str, **plain)
    group.create_array("status", shape=(n,), chunks=chunk, dtype="uint8", fill_value=PENDING, **plain)
    group.create_array("errors", shape=(n,), chunks=chunk, dtype=str, **plain)
    group.create_array("sizes", shape=(n, 2), chunks=chunk + (2,), dtype="int32", fill_value=0, **plain)
    if embed_images:  # one inner chunk per image: training reads them one at a time
        group.create_array("images", shape=(n,), chunks=(1,), shards=chunk, dtype="variable_length_bytes", **plain)
    group["labels"][:] = np.asarray(labels, dtype=np.int32)
    group["keys"][:] = np.asarray(keys, dtype=object)
    if members is not None:  # where each image is in its shard (key: shard/member): one ranged read
        group.create_array("members", shape=(n, 2), chunks=chunk + (2,), dtype="int64", fill_value=-1, **plain)
        group["members"][:] = np.asarray(members, dtype=np.int64)
    from beit import __version__

    group.update_attributes(
        {  # one write: zarr's attrs.update writes key by key
            "format": FORMAT,
            "version": VERSION,
            "writer": f"beit {__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **json.loads(json.dumps(identity)),
            "class_names": list(class_names),
            "chunk_images": chunk[0],
            "embedded_images": embed_images,
            "checksums": CHECKSUMS,
            "complete": False,
            "creating": False,
        }
    )
    return group


class TokenStore:
    """A token store on disk (a local path or an fsspec URL zarr can open)."""

    def __init__(self, group, location: str):
        self.group = group
        self.location = location
        self.attrs = dict(group.attrs)
        self._keys: list[str] | KeyTable | None = None
        self._members: np.ndarray | None = None
        self._source_root: Path | str | None = None
        self.reopened = False  # `prepare` found it made already (to finish or repair), not new
        self._arrays: dict = {}  # `_array`: opened once each
        self._held: dict[str, bool] = {}  # `holds`: asked once each (on object storage, requests)

    # ---------------------------------------------------------------- opening and creating

    @classmethod
    def open(cls, location: str | Path, mode: str = "r", require_complete: bool = True) -> TokenStore:
        location = str(location)
        try:
            group = _open_group(location, mode)
        except ObjectStorageError:
            raise
        except Exception as error:
            raise StoreError(
                f"{location} is not a token store ({error}): pass a folder written by `beit tokenize`."
            ) from None
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise StoreError(
                f"{location} is not a beit token store (format {attrs.get('format')!r}, expected {FORMAT!r})."
            )
        if attrs.get("version") != VERSION:
            raise StoreError(
                f"{location} is token store format version {attrs.get('version')}, this beit reads version "
                f"{VERSION}: tokenize again with this beit, or use the release that wrote it."
            )
        if require_complete and not attrs.get("complete"):
            raise StoreError(
                f"{location} is incomplete ({attrs.get('counts', {}).get('done', 'some')} images not done): run the "
                "same `beit tokenize` command again to finish it."
            )
        return cls(group, location)

    @classmethod
    def prepare(
        cls,
        location: str | Path,
        identity: dict,
        keys: list[str],
        labels: list[int],
        class_names: list[str],
        chunk_images: int,
        embed_images: bool,
        overwrite: bool,
        members: np.ndarray | None = None,
    ) -> TokenStore:
        """Create the store, or reopen one made by the same tokenizer, views and source to finish
        it. `identity` = {tokenizer, views, source, grid}; any difference is refused unless `overwrite`.
        `members`: [N, 2] (offset, size) of each image in its tar shard, for a source of shards."""
        location = str(location)
        try:
            existing = _open_group(location, "r")
        except ObjectStorageError:
            raise  # a store that could not be read is not made again
        except Exception:
            existing = None
        if existing is not None and not overwrite:
            attrs = dict(existing.attrs)
            ours_unfinished = attrs.get("format") == FORMAT and attrs.get("creating") is not False
            if not ours_unfinished and (attrs or list(existing.keys())):  # else a creation killed half-way: again
                refuse_another(location, attrs, identity, chunk_images, len(keys))
                store = cls(_open_group(location, "r+"), location)
                store.reopened = True
                return store
        group = create(location, identity, keys, labels, class_names, chunk_images, embed_images, members)
        return cls(group, location)

    # ---------------------------------------------------------------- what it records (typed)

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def counts(self) -> dict[str, int]:
        """{images, done, failed}, recorded when the store was completed ({} before)."""
        return dict(self.attrs.get("counts") or {})

    @property
    def writer(self) -> str | None:
        """ "beit X.Y.Z" of the release that made the store."""
        return self.attrs.get("writer")

    @property
    def created(self) -> str | None:
        """When the store was created (UTC, ISO 8601)."""
        return self.attrs.get("created")

    @property
    def tokenizer_record(self) -> dict:
        """The tokenizer's identity: {kind, sha256, vocab_size, input_size, grid, downsample, arch}."""
        return dict(self.attrs["tokenizer"])

    @property
    def tokenizer_sha256(self) -> str:
        return self.attrs["tokenizer"]["sha256"]

    @property
    def vocab_size(self) -> int:
        return int(self.attrs["tokenizer"]["vocab_size"])

    @property
    def tokenizer_size(self) -> int:
        """The tokenizer's input size in pixels: the side of a view as it was tokenized."""
        return int(self.attrs["tokenizer"]["input_size"])

    @property
    def tokenizer_path(self) -> Path | None:
        """Where the tokenizer file was when the store was made (a hint: it may be gone)."""
        path = self.attrs.get("tokenizer_path")
        return Path(path) if path else None

    @property
    def view_seed(self) -> int:
        return int(self.attrs["views"]["seed"])

    @property
    def view_config(self):
        """The `views.ViewConfig` the views were drawn and rendered with."""
        from beit.shared.views import ViewConfig

        config = self.attrs["views"]["config"]
        return ViewConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})

    @property
    def image_size(self) -> int:
        """The side in pixels of a view as the ViT sees it (a multiple of the patch size)."""
        return int(self.attrs["views"]["config"]["image_size"])

    @property
    def source_record(self) -> dict:
        """{kind, images, fingerprint, classes}: what the source was."""
        return dict(self.attrs["source"])

    @property
    def source_fingerprint(self) -> str:
        return self.attrs["source"]["fingerprint"]

    @property
    def source_root(self) -> Path | str:
        """The folder (or URL) the keys are relative to: as the host that tokenized saw it, or
        where `use_source_root` pointed it (the same data mounted elsewhere, another bucket)."""
        if self._source_root is not None:
            return self._source_root
        root = self.attrs.get("source_root", ".")
        return root if is_url(root) else Path(root)

    def use_source_root(self, root: str | Path) -> None:
        """Read the source files under `root` (a folder or a URL) instead of the recorded one: the
        same data elsewhere (another mount, another bucket), refused unless it is the same
        source. A folder is listed again and its fingerprint compared; a list file's keys are the
        store's own, so its files are looked for there (`check_sources` names any that are missing)."""
        root = str(root) if is_url(str(root)) else Path(root)
        record = self.source_record
        if record.get("kind") in ("folder", "imagefolder"):
            try:
                found = read_source(root, every_entry=True).fingerprint()
            except ValueError as error:
                raise StoreError(f"--source-root {root}: {error}") from None
            if found != record.get("fingerprint"):
                raise StoreError(
                    f"--source-root {root} does not hold the images {self.location} was made from (its files and "
                    f"sizes differ from the store's record of {self.source_root}): point it at a copy of that folder."
                )
        elif not is_url(root) and not root.is_dir():
            raise StoreError(f"--source-root {root} is not a folder: point it at the folder the list file was in.")
        self._source_root = root

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs.get("class_names") or [])

    def holds(self, name: str) -> bool:
        """Whether the store has the array `name` (the optional ones: images, members, sizes). Every
        array is made with the store, so this is asked once: on object storage, `name in group` costs a
        HEAD and a listing, which per batch or per chunk added four requests to each."""
        if name not in self._held:
            self._held[name] = name in self.group
        return self._held[name]

    def _array(self, name: str):
        """The array `name`, opened once (its metadata is fixed when the store is made; on object
        storage each opening is a request, and stage 1 writes six arrays a chunk)."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    @property
    def has_embedded_images(self) -> bool:
        return self.holds("images")

    @property
    def tokenizer_precision(self) -> dict | None:
        """How the tokenizer ran ({body, tf32, device}: `dvae.Precision` and the device type), or
        None for a store made before it was recorded."""
        return self.attrs.get("tokenizer_precision")

    def record_run(self, source_root: Path | str, tokenizer_path: Path, precision: dict) -> None:
        """Where the images and the tokenizer are (resolved) and how the tokenizer runs, for
        stage 2, verify and online targets."""
        self.group.update_attributes(
            {
                "source_root": source_root if is_url(source_root) else str(Path(source_root).resolve()),
                "tokenizer_path": str(Path(tokenizer_path).resolve()),
                "tokenizer_precision": precision,
            }
        )
        self.attrs = dict(self.group.attrs)

    # ---------------------------------------------------------------- what it holds

    def __len__(self) -> int:
        return self.group["tokens"].shape[0]

    @property
    def views_per_image(self) -> int:
        return self.group["tokens"].shape[1]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.group["tokens"].shape[2:])

    @property
    def chunk_images(self) -> int:
        return self.group["status"].chunks[0]

    def chunks(self) -> list[tuple[int, int]]:
        """(start, stop) of every chunk of images."""
        c, n = self.chunk_images, len(self)  # each asks zarr for an array's metadata: once, not per chunk
        return [(start, min(start + c, n)) for start in range(0, n, c)]

    def chunk_done(self, start: int, stop: int) -> bool:
        """Whether a chunk has no pending image. A chunk whose status a crash left unreadable is pending."""
        try:
            return bool(np.all(self.group["status"][start:stop] != PENDING))
        except ObjectStorageError:
            raise
        except Exception:
            return False

    def status(self) -> np.ndarray:
        return self._checked("status", None, lambda: self.group["status"][:])

    def pending_chunks(self) -> list[tuple[int, int]]:
        """(start, stop) of every chunk that still has a pending image, from one read of `status`
        (chunk by chunk only when a crash left some chunk unreadable). A chunk's status is written
        whole and never all pending, so a store with no status chunk on disk yet (one listing to
        know) is all pending, without reading N / chunk_images missing files."""
        try:
            if self.group["status"].nchunks_initialized == 0:
                return self.chunks()
        except ObjectStorageError:
            raise
        except Exception:
            pass
        try:
            pending = self.status() == PENDING
        except ObjectStorageError:
            raise
        except Exception:
            return [chunk for chunk in self.chunks() if not self.chunk_done(*chunk)]
        starts = np.arange(0, len(pending), self.chunk_images)
        open_chunks = np.flatnonzero(np.logical_or.reduceat(pending, starts)) if len(pending) else []
        return [(int(starts[i]), int(min(starts[i] + self.chunk_images, len(pending)))) for i in open_chunks]

    # ---------------------------------------------------------------- writing

    def write_chunk(
        self,
        start: int,
        tokens: np.ndarray,
        views: np.ndarray,
        status: np.ndarray,
        errors: list[str],
        images: list[bytes] | None = None,
        sizes: np.ndarray | None = None,
    ) -> None:
        """Write one whole chunk (all arrays), its status last. `sizes`: [n, 2] (height, width). A
        full disk stops it with one sentence; the chunk stays pending (its status is written last)."""
        stop = start + len(status)
        try:
            self._array("tokens")[start:stop] = tokens.astype(np.uint16)
            self._array("views")[start:stop] = views.astype(np.float32)
            if sizes is not None and self.holds("sizes"):
                self._array("sizes")[start:stop] = sizes.astype(np.int32)
            self._array("errors")[start:stop] = np.asarray(errors, dtype=object)
            if images is not None and self.holds("images"):
                self._array("images")[start:stop] = np.asarray(images, dtype=object)
            self._array("status")[start:stop] = status.astype(np.uint8)
        except OSError as error:
            if not out_of_space(error):
                raise
            needed = tokens.nbytes + views.nbytes + sum(len(i) for i in images or [])
            raise StoreError(no_room(self.location, f"the chunk of images {start}-{stop - 1}", needed)) from None

    def mark_complete(self) -> dict:
        status = self.status()
        if np.any(status == PENDING):
            raise StoreError(f"{self.location} still has {int(np.sum(status == PENDING))} pending images.")
        counts = {"images": len(status), "done": int(np.sum(status == DONE)), "failed": int(np.sum(status == FAILED))}
        self.group.update_attributes(
            {"counts": counts, "completed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        )
        self.group.update_attributes({"complete": True})  # last, on its own
        self.attrs = dict(self.group.attrs)
        return counts

    # ---------------------------------------------------------------- damage

    @property
    def has_checksums(self) -> bool:
        """Whether every chunk carries a checksum (stores made before them do not)."""
        return self.attrs.get("checksums") == CHECKSUMS

    def damaged(self, arrays: tuple[str, ...] | None = None, start: int = 0, stop: int | None = None) -> list[dict]:
        """Every chunk (of `arrays`, default all; within images [start, stop)) that cannot be read
        back as written: {array, start, stop, why}, in array order, then image order. A checksum
        that does not match is the usual why; a chunk that does not decode is the other."""
        found = []
        n = len(self)
        stop = n if stop is None else stop
        for name in arrays or WORK_ARRAYS + LISTING_ARRAYS:
            if not self.holds(name):
                continue
            array = self.group[name]
            step = self.chunk_images if name == "images" else array.chunks[0]  # images: one shard a chunk
            for a in range(start - start % step, stop, step):
                b = min(a + step, n)
                try:
                    array[a:b]
                except ObjectStorageError:
                    raise  # not a damaged chunk: one that could not be read now
                except Exception as error:  # zarr raises what the codec raises: ValueError, RuntimeError, ...
                    why = (
                        "its crc32c checksum does not match"
                        if "checksum" in str(error)
                        else f"it does not decode ({error})"
                    )
                    found.append({"array": name, "start": a, "stop": b, "why": why})
        return found

    def damage_error(self, name: str, start: int, stop: int, error: Exception) -> StoreError:
        """The one sentence for a read of `name` images [start, stop) that failed: the damaged
        chunks named (when the failure is one), and what to do."""
        damage = self.damaged((name,), start, stop)
        if not damage:
            return StoreError(f"{self.location}: reading {name} failed ({error}).")
        first = damage[0]
        more = f", and {len(damage) - 1} more chunks of it" if len(damage) > 1 else ""
        return StoreError(
            f"{self.location}: the chunk of {name} holding images {first['start']}-{first['stop'] - 1} is damaged "
            f"({first['why']}){more}: `beit store verify --full` lists every damaged chunk, and running the same "
            "`beit tokenize` command again redoes them."
        )

    def repair(self, keys=None, labels=None, members=None) -> list[dict]:
        """Find every damaged chunk (`damaged`) and undo it: a work chunk's images are marked
        pending (its status rewritten whole) so that tokenizing again redoes them; a listing chunk
        is rewritten from `keys`, `labels`, `members` (the source's listing, which the store's
        fingerprint has already matched), or refused without them. The store is no longer
        complete when anything was damaged. Returns what was found."""
        damage = self.damaged()
        if not damage:
            return []
        for entry in damage:
            a, b = entry["start"], entry["stop"]
            if entry["array"] in WORK_ARRAYS:
                self.group["status"][a:b] = np.full(b - a, PENDING, dtype=np.uint8)
                continue
            given = {"keys": keys, "labels": labels, "members": members}[entry["array"]]
            if given is None:
                raise StoreError(
                    f"{self.location}: the chunk of {entry['array']} holding images {a}-{b - 1} is damaged "
                    f"({entry['why']}), and only `beit tokenize` with the store's source can write it again."
                )
            dtype = {"keys": object, "labels": np.int32, "members": np.int64}[entry["array"]]
            self.group[entry["array"]][a:b] = np.asarray(given[a:b], dtype=dtype)
        if self.attrs.get("complete"):
            self.group.update_attributes({"complete": False})
            self.attrs = dict(self.group.attrs)
        return damage

    def _checked(self, name: str, indices, read):  # noqa: ANN001
        """`read()`, or when it fails on a damaged chunk of `name`, the sentence naming that chunk."""
        try:
            return read()
        except (StoreError, ObjectStorageError):
            raise
        except Exception as error:
            picked = np.asarray(indices if indices is not None else [0, len(self) - 1], dtype=np.int64)
            start, stop = (int(picked.min()), int(picked.max()) + 1) if len(picked) else (0, 0)
            if not self.damaged((name,), start, stop):
                raise
            raise self.damage_error(name, start, stop, error) from None

    # ---------------------------------------------------------------- reading

    def failures(self, limit: int | None = None) -> list[tuple[str, str]]:
        """(key, why) of every failed image (the first `limit` of them), in store order; read a
        chunk at a time, only the chunks that hold failures."""
        status = self.status()
        found: list[tuple[str, str]] = []
        for start, stop in self.chunks():
            if limit is not None and len(found) >= limit:
                break
            failed = np.flatnonzero(status[start:stop] == FAILED)
            if not len(failed):
                continue
            keys, errors = self.group["keys"][start:stop], self.group["errors"][start:stop]
            found += [(str(keys[i]), str(errors[i])) for i in failed]
        return found if limit is None else found[:limit]

    def tokens(self, indices: np.ndarray | None = None) -> np.ndarray:
        """The tokens of the images `indices` (sorted store indices; None: all), [n, V, gh, gw]
        uint16, in memory."""
        return self._checked("tokens", indices, lambda: _select(self.group["tokens"], indices))

    def view_params(self, indices: np.ndarray | None = None) -> np.ndarray:
        """The views' parameters of the images `indices` (sorted; None: all), [n, V, 8] float32."""
        return self._checked("views", indices, lambda: _select(self.group["views"], indices))

    def labels(self) -> np.ndarray:
        """[N] int32 class indices, -1 = none."""
        return self.group["labels"][:]

    def keys(self, indices: np.ndarray | None = None) -> list[str]:
        """The images' keys (paths relative to the source root, or as listed)."""
        return [str(k) for k in self._checked("keys", indices, lambda: _select(self.group["keys"], indices))]

    def image_sizes(self, indices: np.ndarray | None = None) -> np.ndarray | None:
        """[n, 2] int32 (height, width) of the images `indices` (sorted; None: all) as stage 1 read
        them, or None for a store made before they were recorded."""
        if not self.holds("sizes"):
            return None
        return self._checked("sizes", indices, lambda: _select(self.group["sizes"], indices))

    def source_items(self, indices, root: Path | str | None = None) -> list:
        """The source's own file for each of the images `indices`, under `root` (default: the
        store's source root): a path or URL (root + key), or for tar shards the member
        (`images.TarMember`, one ranged read of the shard)."""
        indices = np.asarray(indices, dtype=np.int64)
        root = self.source_root if root is None else root
        # the node's key table when mapped, else only the chunks holding `indices`
        keys = [self._keys[i] for i in indices] if self._keys is not None else _read(self.group["keys"], indices)
        if not self.holds("members"):
            return [join(root, str(key)) for key in keys]
        members = self._members[indices] if self._members is not None else _read(self.group["members"], indices)
        out = []
        for key, (offset, size) in zip(keys, members, strict=True):
            shard = join(root, str(key).split("/", 1)[0])
            missing = "" if offset >= 0 else "the sample has no image (no member named like one)"
            out.append(TarMember(shard, int(offset), int(size), missing))
        return out

    def items(self, indices) -> list:
        """What to decode for the images `indices`, by the one rule: the store's embedded copy
        when it holds one (exactly the bytes that were tokenized, even if the source changed
        since), else the original file (`source_items`). Embedded copies are read image by
        image (one inner chunk of a shard each), never the whole array; the keys come from the
        node's key table after `node_copy`, else they are read once."""
        indices = np.asarray(indices, dtype=np.int64)
        if not self.has_embedded_images:
            return self.source_items(indices)
        order = np.argsort(indices, kind="stable")
        picked = self._checked("images", indices, lambda: _select(self.group["images"], indices[order]))
        out: list = [b""] * len(indices)
        for position, blob in zip(order, picked, strict=True):
            out[position] = bytes(blob)
        return out

    def node_copy(self, cache_root: str | Path = "") -> NodeCopy:
        """This store's training arrays from one node-local copy (`beit.shared.node_copy`),
        memory-mapped; its keys (and tar members) are then read from the copy too."""
        from beit.shared.node_copy import make_node_copy

        copy = make_node_copy(self, cache_root)
        self._keys = copy.keys
        if copy.members is not None:
            self._members = copy.members
        return copy

    def check_sources(self, indices, flag: str = "--embed-images") -> None:
        """Refuse, in one sentence, a store whose images come from source files (it embeds none)
        when any of `indices`' files is gone."""
        if self.has_embedded_images:
            return
        missing = [str(item) for item in self.items(indices) if not exists(getattr(item, "shard", item))]
        if missing:
            raise StoreError(
                f"{self.location}'s source file {missing[0]} is gone (and {len(missing) - 1} more of the "
                f"{len(indices)} checked), and the store holds no copies: restore the source at "
                f"{self.source_root}, point --source-root at a copy of it, or tokenize again with {flag}."
            )


class StoreItems:
    """The images `indices` of a store as a sequence of what to decode (`TokenStore.items`),
    each read when asked: a data set made from a store holds no copy of its images."""

    def __init__(self, store: TokenStore, indices: np.ndarray):
        self.store, self.indices = store, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        """A path, a URL, a tar member (`images.TarMember`) or the embedded bytes."""
        return self.store.items(self.indices[position : position + 1])[0]

    def take(self, positions) -> list:
        """The items at `positions`, read together."""
        return self.store.items(self.indices[np.asarray(positions, dtype=np.int64)])


def _read(array, indices: np.ndarray) -> np.ndarray:
    """array[indices] in the order given (any order, repeats allowed), reading only the chunks needed."""
    unique, inverse = np.unique(indices, return_inverse=True)
    return _select(array, unique)[inverse]


def _select(array, indices: np.ndarray | None) -> np.ndarray:
    """array[indices] along the first axis (all of it for None), reading only the chunks needed."""
    if indices is None:
        return array[:]
    indices = np.asarray(indices, dtype=np.int64)
    if not len(indices):
        return array[0:0]
    return array.get_orthogonal_selection((indices,))
