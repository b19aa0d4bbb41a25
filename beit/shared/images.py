"""Finding source images (an ImageFolder tree, a folder, a list file, tar shards; local or at a URL), reading them."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from beit.shared.object_storage import ObjectStorageError, ShortRead, configure, retrying, transient

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# Image formats a photo folder may hold that this project does not read: listed as failed
# entries of a tokenized source ("unsupported format"), never silently left out.
OTHER_IMAGE_SUFFIXES = {
    ".gif", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".svg", ".ico", ".psd", ".tga",
    ".ppm", ".pgm", ".pbm", ".pnm", ".exr", ".hdr", ".dng", ".cr2", ".nef", ".arw", ".raw",
}  # fmt: skip


@dataclass
class Source:
    """The images of a data set, in a fixed order, with labels (-1 = none)."""

    kind: str  # "imagefolder" | "folder" | "list"
    root: Path | str  # a local folder or a URL
    files: Sequence[Path | bytes]  # the file, or its bytes (a store's embedded copy: `store.StoreItems`)
    keys: list[str]  # path relative to root (or as listed), the stable name of each image
    labels: list[int]
    class_names: list[str] = field(default_factory=list)
    # the fingerprint when it is known without reading the files (a token store's images: the
    # store's source fingerprint and the indices chosen); entries then have size 0
    known_fingerprint: str | None = None
    listed_sizes: list[int] | None = None  # the file sizes a listing gave (object storage), so none is asked again

    def take(self, positions) -> list[Path | bytes]:
        """The files (or bytes) at `positions`, read together when they come from a store."""
        if hasattr(self.files, "take"):
            return self.files.take(positions)
        return [self.files[i] for i in positions]

    def entries(self) -> list[tuple[str, int]]:
        """(relative path, file size) of every entry, sorted: what the fingerprint digests. The
        size is -1 for a missing file or an entry that is not a file (a folder's size changes
        with what it holds). A list file's entries are its (path, label) lines in their order:
        the list is the source's identity, and stat-ing millions of files would take minutes."""
        if self.known_fingerprint is not None:
            return sorted((key, 0) for key in self.keys)
        if self.kind == "list":  # as listed, with labels: a list of millions of paths is not stat-ed
            return list(zip(self.keys, self.labels, strict=True))
        if self.listed_sizes is not None:
            return sorted(zip(self.keys, self.listed_sizes, strict=True))
        out = []
        for key, path in zip(self.keys, self.files, strict=True):
            if isinstance(path, (bytes, bytearray)):  # an image held in memory (a store's embedded copy)
                out.append((key, len(path)))
                continue
            out.append((key, file_size(path)))
        return sorted(out)

    def fingerprint(self) -> str:
        """sha256 over the sorted relative paths and file sizes (`entries`)."""
        if self.known_fingerprint is not None:
            return self.known_fingerprint
        digest = hashlib.sha256()
        for key, size in self.entries():
            digest.update(f"{key}\t{size}\n".encode())
        return digest.hexdigest()

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "root": str(self.root),
            "images": len(self.files),
            "fingerprint": self.fingerprint(),
            "classes": len(self.class_names),
        }


LIST_SUFFIXES = {".txt", ".lst", ".list", ".csv", ".tsv"}


def is_url(location) -> bool:
    """Whether `location` is an fsspec URL (s3://, gs://, file://, ...) rather than a local path."""
    return isinstance(location, str) and "://" in location


def join(root: Path | str, key: str) -> Path | str:
    """`root / key` for a local folder or a URL; an absolute path or a URL as key stays itself."""
    if is_url(key):
        return key
    if is_url(root):
        return key if key.startswith("/") else f"{root.rstrip('/')}/{key}"
    return Path(root) / key


def _filesystem(url: str):
    import fsspec

    configure()  # its requests tried again by this project's loop alone (`object_storage`)
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:  # an unknown scheme, or its package (s3fs, gcsfs) missing
        raise ValueError(f"{url}: {error}") from None


def _url_error(url: str, error: BaseException) -> ValueError:
    if isinstance(error, ObjectStorageError):
        return error
    if isinstance(error, FileNotFoundError):
        return ValueError(f"{url} does not exist: check the URL (bucket and prefix).")
    if isinstance(error, PermissionError):
        return ValueError(f"{url} cannot be read (access denied): check the credentials (AWS_* variables or ~/.aws).")
    return ValueError(f"{url} cannot be read ({type(error).__name__}: {error}): check the URL and the credentials.")


def file_size(path: Path | str) -> int:
    """The size of a regular file (a local path or a URL); -1 for a missing file or an entry
    that is not a file."""
    if is_url(path):
        fs, inner = _filesystem(path)
        try:
            info = retrying(path, "reading its size", lambda left: fs.info(inner, timeout=left))
        except ObjectStorageError:
            raise
        except (OSError, ValueError):
            return -1
        return int(info.get("size") or 0) if info.get("type") == "file" else -1
    try:
        info = Path(path).stat()
    except OSError:
        return -1
    return info.st_size if stat.S_ISREG(info.st_mode) else -1


def fetch(items: list) -> dict:
    """Each URL's (or tar member's) bytes, fetched together (concurrently on object storage), or
    why it could not be read ("unreadable: ..."). A fault of the object storage that outlasts the
    retries (`object_storage`) raises `ObjectStorageError`: it says nothing of the image."""
    out: dict = {}
    members = [item for item in items if isinstance(item, TarMember)]
    remote = [m for m in members if is_url(str(m.shard)) and not m.missing]
    for member in members:
        if member not in remote:
            out[member] = _read_member(member)
    if remote:  # ranged reads of shards on object storage, concurrently

        def read_ranges(todo: list[TarMember], left: float) -> list:
            fs, _ = _filesystem(str(todo[0].shard))
            paths = [fs._strip_protocol(str(m.shard)) for m in todo]
            ends = [m.offset + m.size for m in todo]
            return fs.cat_ranges(paths, [m.offset for m in todo], ends, on_error="return", timeout=left)

        for member, value in _read_together(remote, read_ranges, lambda m: m.size).items():
            bad = isinstance(value, BaseException)
            out[member] = f"unreadable: {type(value).__name__}: {value}" if bad else bytes(value)
    urls = [item for item in items if is_url(item)]
    if not urls:
        return out

    def read_objects(todo: list[str], left: float) -> list:
        fs, _ = _filesystem(todo[0])
        paths = [fs._strip_protocol(url) for url in todo]
        got = fs.cat(paths, on_error="return", timeout=left)
        return [got.get(path, FileNotFoundError(path)) for path in paths]

    for url, value in _read_together(urls, read_objects).items():
        if isinstance(value, BaseException):
            why = "no such object" if isinstance(value, FileNotFoundError) else f"{type(value).__name__}: {value}"
            out[url] = f"unreadable: {why}"
        else:
            out[url] = bytes(value)
    return out


def _read_together(items: list, read, size=None) -> dict:
    """{item: its bytes, or the error that is its answer (no such object, access denied)}, from
    `read(items, seconds left)` (bytes or an error each, in order): the items that met a fault of
    the object storage, or whose bytes are fewer than `size(item)` (a body cut short), are read
    again (`object_storage.retrying`) until none is left or the tries run out."""
    out: dict = {}
    failing: list = []

    def attempt(left: float) -> dict:
        todo = [item for item in items if item not in out]
        try:
            got = read(todo, left)
        except Exception as error:  # the whole request failed (a timeout, no such bucket, no access)
            got = [error] * len(todo)
        fault = None
        for item, value in zip(todo, got, strict=True):
            if size is not None and not isinstance(value, BaseException) and len(value) != size(item):
                value = ShortRead(f"{len(value)} of its {size(item)} bytes came")
            if isinstance(value, BaseException) and transient(value):
                fault = fault or (item, value)
            else:
                out[item] = value
        if fault is not None:
            failing[:] = [fault[0]]
            raise fault[1]
        return out

    return retrying(lambda: str(failing[0]) if failing else str(items[0]), "reading it", attempt)


def _read_member(member: TarMember) -> bytes | str:
    """A local tar member's bytes (one ranged read), or why not (members on object storage are
    read together, by `fetch`)."""
    if member.missing:
        return member.missing
    try:
        with open(member.shard, "rb") as f:
            return os.pread(f.fileno(), member.size, member.offset)
    except OSError as error:
        return f"unreadable: {error.strerror or error}"


def is_remote(item) -> bool:
    """Whether `item` is read by `fetch` (a URL or a tar member) rather than opened as a file."""
    return isinstance(item, TarMember) or is_url(item)


def read_bytes(item: Path | str | bytes) -> bytes:
    """The bytes of a file, an object at a URL, or bytes already read."""
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if is_remote(item):
        value = fetch([item])[item]
        if isinstance(value, str):
            raise OSError(f"{item}: {value}")
        return value
    return Path(item).read_bytes()


def exists(item: Path | str) -> bool:
    return file_size(item) >= 0


def source_root(source: Path | str) -> Path | str:
    """The folder a source's keys are relative to: the folder itself, or a list file's folder
    (a URL's parent for a list at a URL)."""
    if is_url(source):
        is_file = source.lower().endswith((*LIST_SUFFIXES, ".tar"))  # a list file or a tar shard: its folder
        return source.rsplit("/", 1)[0] if is_file else source.rstrip("/")
    source = Path(source)
    return source.parent if source.is_file() else source


class RootedPaths(Sequence):
    """`join(root, key)` for each key (an absolute key or a URL stays itself), made when asked: a
    list of millions of paths holds its strings once, not a Path object per line."""

    def __init__(self, root: Path | str, keys: list[str]):
        self.root, self.keys = root, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [join(self.root, key) for key in self.keys[i]]
        return join(self.root, self.keys[i])


def _images_under(folder: Path, every_entry: bool = False) -> tuple[list[Path], list[Path]]:
    """(the image files under `folder`, its entries), from one walk. Entries are everything named
    like an image, readable or not: files, symbolic links (broken ones too), folders, pipes, other
    image formats; and folders that cannot be listed. Side files (.txt, .json, ...) are neither.
    Without `every_entry` the entries are the image files."""
    images, entries = [], []
    for path in folder.rglob("*"):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            images.append(path)
            entries.append(path)
        elif not every_entry:
            continue
        elif path.suffix.lower() in IMAGE_SUFFIXES | OTHER_IMAGE_SUFFIXES:
            entries.append(path)
        elif not path.is_symlink() and path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
            entries.append(path)  # its images cannot be listed: it stands for them
    return sorted(images), sorted(entries)


def _folder_source(name, root, files, keys: list[str], image_keys: list[str], sizes=None) -> Source:
    """A folder's Source: an ImageFolder tree when every readable image is in a sub-folder."""
    if not image_keys and keys:
        raise ValueError(
            f"{name} holds no image this project reads ({', '.join(sorted(IMAGE_SUFFIXES))}), only "
            f"{len(keys)} entries such as {keys[0]} that it cannot read: convert them to JPEG or PNG, or check "
            "the path."
        )
    if not image_keys:
        raise ValueError(f"{name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): check the path.")
    if all("/" in k for k in image_keys):
        class_names = sorted({k.split("/", 1)[0] for k in image_keys})
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index.get(k.split("/", 1)[0], -1) if "/" in k else -1 for k in keys]
        return Source("imagefolder", root, files, keys, labels, class_names, listed_sizes=sizes)
    return Source("folder", root, files, keys, [-1] * len(files), listed_sizes=sizes)


_IMAGE_LIKE = tuple(sorted(IMAGE_SUFFIXES | OTHER_IMAGE_SUFFIXES))

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # in a path: not a file name anyone wrote


def _list_fields(text: str, name: str) -> list[tuple[int, str, str | None]]:
    """(line number, path, label or None) of each line, read line by line: comments, commas and
    tabs allowed, and every malformed line named with its number."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").replace("\t", " ").split()
        if len(parts) > 2:
            raise ValueError(f"{name}:{number}: expected 'path [label]', got {line!r}: quote no spaces in paths.")
        entries.append((number, parts[0], parts[1] if len(parts) == 2 else None))
    return entries


def _list_source(text: str, name: str, root: Path | str, fast: bool = True) -> Source:
    """A list file's Source: one `path [label]` per line, paths relative to `root` (or absolute,
    or URLs). A plain list (no comments or commas, every line one or every line two fields, as an
    ImageNet list is) is split at C speed: 14M lines take seconds."""
    # the plain case at C speed: no comments or commas, no blank line, every line 1 or every line 2
    # fields (a line of 1 and a line of 3 pair a label with a path, which fails the suffix check
    # below; the file is then read line by line, which names the line)
    lines = text.count("\n") + (not text.endswith("\n"))
    plain = fast and "#" not in text and "," not in text and "\n\n" not in text and not _CONTROL.search(text)
    fields = text.split() if plain else []
    if fields and len(fields) == lines:
        paths, raw = fields, None
    elif fields and len(fields) == 2 * lines:
        paths, raw = fields[0::2], fields[1::2]
    else:
        entries = _list_fields(text, name)
        paths = [path for _, path, _ in entries]
        raw = [label for _, _, label in entries]
        if all(label is None for label in raw):
            raw = None
        elif any(label is None for label in raw):
            raise ValueError(f"{name}: some lines have a label and some do not: label all of them or none.")
    if not paths:
        raise ValueError(f"{name} lists no images: write one 'path [label]' per line.")
    image_like, checked = _IMAGE_LIKE, plain  # a plain text holds no control character
    bad = next(
        (i for i, p in enumerate(paths) if not p.lower().endswith(image_like) or (not checked and _CONTROL.search(p))),
        -1,
    )
    if bad >= 0 and plain:  # the fast split may have paired fields across lines: read line by line
        return _list_source(text, name, root, fast=False)
    if bad >= 0:
        raise ValueError(
            f"{name}:{entries[bad][0]}: {paths[bad]!r} is not a path to an image (a file name ending in "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}): fix the line, one 'path [label]' per line."
        )
    if raw is None:
        labels, class_names = [-1] * len(paths), []
    else:
        try:
            labels, class_names = list(map(int, raw)), []
        except ValueError:  # class names
            class_names = sorted(set(raw))
            index = {name: i for i, name in enumerate(class_names)}
            labels = [index[label] for label in raw]
    return Source("list", root, RootedPaths(root, paths), paths, labels, class_names)


def _read_url(url: str, every_entry: bool) -> Source:
    """A folder or list file at an fsspec URL: listed once (sizes come with the listing)."""
    fs, path = _filesystem(url)
    try:
        info = retrying(url, "looking it up", lambda left: fs.info(path, timeout=left))
    except Exception as error:
        raise _url_error(url, error) from None
    if info.get("type") != "directory":
        if not url.lower().endswith(tuple(LIST_SUFFIXES)):
            raise ValueError(f"{url} is neither a folder of images nor a .txt file listing them: check the URL.")
        try:
            text = retrying(url, "reading it", lambda left: fs.cat_file(path, timeout=left)).decode()
        except Exception as error:
            raise _url_error(url, error) from None
        return _list_source(text, url, source_root(url))
    try:
        # a listing of millions of objects may take longer than one read may: its pages are bounded
        found = retrying(url, "listing it", lambda _left: fs.find(path, detail=True))
    except Exception as error:
        raise _url_error(url, error) from None
    base = path.rstrip("/") + "/"
    listed = {
        name[len(base) :]: int(meta.get("size") or 0)
        for name, meta in found.items()
        if meta.get("type", "file") == "file" and name.startswith(base)
    }
    suffixes = IMAGE_SUFFIXES | OTHER_IMAGE_SUFFIXES if every_entry else IMAGE_SUFFIXES
    keys = sorted(k for k in listed if Path(k).suffix.lower() in suffixes)
    image_keys = [k for k in keys if Path(k).suffix.lower() in IMAGE_SUFFIXES]
    root = url.rstrip("/")
    return _folder_source(url, root, [join(root, k) for k in keys], keys, image_keys, [listed[k] for k in keys])


SHARD_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass(frozen=True)
class TarMember:
    """One sample's image inside a tar shard: `size` bytes at `offset` of `shard` (a path or a
    URL), read with one ranged read; `missing` says why a sample has no image to read."""

    shard: Path | str
    offset: int
    size: int
    missing: str = ""

    def __str__(self) -> str:
        return f"{self.shard}@{self.offset}"


def is_shards(source) -> bool:
    """Whether `source` names tar shards: a .tar path or URL, or a brace range of them."""
    text = str(source)
    if not text.lower().endswith(".tar"):
        return False
    return is_url(text) or bool(SHARD_RANGE.search(text)) or not Path(text).is_dir()


def expand_shards(source: str) -> list[str]:
    """`shards-{000000..000002}.tar` -> shards-000000.tar, shards-000001.tar, shards-000002.tar (the
    width of the first number kept); a name without a range is itself."""
    match = SHARD_RANGE.search(source)
    if not match:
        return [source]
    if "/" in source[match.end() :]:  # the store names an image by its shard's file name
        raise ValueError(f"{source}: put the {{first..last}} range in the shards' file name, not in a folder name.")
    first, last = match.group(1), match.group(2)
    width = len(first)
    return [
        source[: match.start()] + str(i).zfill(width) + source[match.end() :] for i in range(int(first), int(last) + 1)
    ]


def _open_binary(location: Path | str):
    if is_url(str(location)):
        fs, inner = _filesystem(str(location))
        return fs.open(inner, "rb")
    return open(location, "rb")  # noqa: SIM115 (closed by the caller's with)


def _read_shards(source: str, every_entry: bool) -> Source:
    """Webdataset-style tar shards: samples are the members sharing a name up to the first dot of
    their file name; a sample's image is its member named like an image, its class the integer in
    its `.cls` member (-1 without one). Only the headers are read (the data is skipped over)."""
    shards = expand_shards(source)
    root = source_root(shards[0])
    suffixes = IMAGE_SUFFIXES | OTHER_IMAGE_SUFFIXES if every_entry else IMAGE_SUFFIXES
    files, keys, labels, sizes = [], [], [], []
    for shard in shards:
        name = shard.rsplit("/", 1)[-1]
        location = shard if is_url(shard) else Path(shard)
        samples: dict[str, dict] = {}
        try:
            with _open_binary(location) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.rpartition("/")
                    stem, _, extension = base.partition(".")
                    sample = samples.setdefault(f"{folder}/{stem}" if folder else stem, {})
                    if f".{extension.lower()}" in suffixes and "image" not in sample:
                        sample["image"] = (member.name, member.offset_data, member.size)
                    elif extension.lower() == "cls":
                        sample["cls"] = tar.extractfile(member).read().decode().strip()
        except FileNotFoundError:
            raise ValueError(f"{shard} does not exist: check the shard names and range.") from None
        except PermissionError:
            raise ValueError(f"{shard} cannot be read (access denied): check its permissions or credentials.") from None
        except (tarfile.TarError, OSError) as error:
            raise ValueError(f"{shard} is not a readable tar file ({error}): check the shard.") from None
        for sample_key, sample in samples.items():
            cls = sample.get("cls", "-1")
            if not cls.lstrip("-").isdigit():
                raise ValueError(
                    f"{shard}: sample {sample_key} has class {cls!r}, not an integer: fix its .cls member."
                )
            labels.append(int(cls))
            if "image" in sample:
                member, offset, size = sample["image"]
                keys.append(f"{name}/{member}")
                files.append(TarMember(location, offset, size))
                sizes.append(size)
            else:  # listed, and failed with its reason when decoded: nothing is silently left out
                keys.append(f"{name}/{sample_key}")
                files.append(TarMember(location, -1, 0, "the sample has no image (no member named like one)"))
                sizes.append(-1)
    if not files:
        raise ValueError(f"{source} holds no samples: check the shard names and range.")
    return Source("shards", root, files, keys, labels, [], listed_sizes=sizes)


def read_source(source: Path | str, every_entry: bool = False) -> Source:
    """An ImageFolder tree (every image inside a class sub-folder: labels from the sorted
    sub-folder names), a flat folder (searched recursively, no labels), or a text file with one
    `path [label]` per line (paths relative to the file's folder, absolute, or URLs; labels
    integers or class names); or webdataset-style tar shards (`shards-{000000..000099}.tar`:
    `_read_shards`). Each a local path or an fsspec URL (s3://bucket/prefix/, ..., listed once with
    the sizes the listing gives).

    A folder source lists its readable image files; with `every_entry` (what `beit tokenize` asks,
    so that its store accounts for every input) also each entry named like an image that cannot be
    read (`_images_under`): it fails when decoded, with its reason. The layout (ImageFolder or
    not) and the classes come from the readable images alone; an entry outside the class folders
    has label -1."""
    if is_shards(source):
        return _read_shards(str(source), every_entry)
    if is_url(str(source)):
        return _read_url(str(source), every_entry)
    source = Path(source)
    if source.is_dir():
        images, files = _images_under(source, every_entry)
        keys = [p.relative_to(source).as_posix() for p in files]
        image_keys = [p.relative_to(source).as_posix() for p in images]
        return _folder_source(source, source, files, keys, image_keys)
    if source.is_file() and source.suffix.lower() in LIST_SUFFIXES:
        return _list_source(source.read_text(), str(source), source_root(source))
    raise ValueError(f"{source} is neither a folder of images nor a .txt file listing them: check the path.")


def list_images(source: Path) -> list[Path]:
    """Just the image files of a source (a folder, a list file, or one image)."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
        return [source]
    return read_source(source).files


def read_image(path: Path, size: int):
    """An image file -> [3, size, size] in [0, 1]: EXIF orientation applied, RGB, shorter side
    resized to `size` (Lanczos), centre crop. (For pictures and checks; training renders through DALI.)"""
    import numpy as np
    import torch
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path} is not a readable image ({error}).") from None
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.LANCZOS)
    left, top = (width - size) // 2, (height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
