"""Finding source images: an ImageFolder tree, a flat folder, or a text file listing paths."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    root: Path
    files: Sequence[Path | bytes]  # the file, or its bytes (a store's embedded copy: `store.StoreItems`)
    keys: list[str]  # path relative to root (or as listed), the stable name of each image
    labels: list[int]
    class_names: list[str] = field(default_factory=list)
    # the fingerprint when it is known without reading the files (a token store's images: the
    # store's source fingerprint and the indices chosen); entries then have size 0
    known_fingerprint: str | None = None

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


def file_size(path: Path) -> int:
    """The size of a regular file; -1 for a missing file or an entry that is not a file."""
    try:
        info = path.stat()
    except OSError:
        return -1
    return info.st_size if stat.S_ISREG(info.st_mode) else -1


def source_root(source: Path) -> Path:
    """The folder a source's keys are relative to: the folder itself, or a list file's folder."""
    source = Path(source)
    return source.parent if source.is_file() else source


class RootedPaths(Sequence):
    """`root / key` for each key (an absolute key stays itself), made when asked: a list of
    millions of paths holds its strings once, not a Path object per line."""

    def __init__(self, root: Path, keys: list[str]):
        self.root, self.keys = Path(root), keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.root / key for key in self.keys[i]]
        return self.root / self.keys[i]


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


def read_source(source: Path, every_entry: bool = False) -> Source:
    """An ImageFolder tree (every image inside a class sub-folder: labels from the sorted
    sub-folder names), a flat folder (searched recursively, no labels), or a text file with one
    `path [label]` per line (paths relative to the file's folder; labels integers or class names).

    A folder source lists its readable image files; with `every_entry` (what `beit tokenize` asks,
    so that its store accounts for every input) also each entry named like an image that cannot be
    read (`_images_under`): it fails when decoded, with its reason. The layout (ImageFolder or
    not) and the classes come from the readable images alone; an entry outside the class folders
    has label -1."""
    source = Path(source)
    if source.is_dir():
        images, files = _images_under(source, every_entry)
        if not images and files:
            raise ValueError(
                f"{source} holds no image this project reads ({', '.join(sorted(IMAGE_SUFFIXES))}), only "
                f"{len(files)} entries such as {files[0].relative_to(source)} that it cannot read: convert "
                "them to JPEG or PNG, or check the path."
            )
        if not images:
            raise ValueError(f"{source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): check the path.")
        keys = [p.relative_to(source).as_posix() for p in files]
        image_keys = [p.relative_to(source).as_posix() for p in images]
        if all("/" in k for k in image_keys):
            class_names = sorted({k.split("/", 1)[0] for k in image_keys})
            index = {name: i for i, name in enumerate(class_names)}
            labels = [index.get(k.split("/", 1)[0], -1) if "/" in k else -1 for k in keys]
            return Source("imagefolder", source, files, keys, labels, class_names)
        return Source("folder", source, files, keys, [-1] * len(files))
    if source.is_file() and source.suffix.lower() in {".txt", ".lst", ".list", ".csv", ".tsv"}:
        entries = []
        for number, line in enumerate(source.read_text().splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.replace(",", " ").replace("\t", " ").split()
            if len(parts) > 2:
                raise ValueError(f"{source}:{number}: expected 'path [label]', got {line!r}: quote no spaces in paths.")
            entries.append((parts[0], parts[1] if len(parts) == 2 else None))
        if not entries:
            raise ValueError(f"{source} lists no images: write one 'path [label]' per line.")
        raw_labels = [label for _, label in entries]
        if all(label is None for label in raw_labels):
            labels, class_names = [-1] * len(entries), []
        elif any(label is None for label in raw_labels):
            raise ValueError(f"{source}: some lines have a label and some do not: label all of them or none.")
        elif all(label.lstrip("-").isdigit() for label in raw_labels):
            labels, class_names = [int(label) for label in raw_labels], []
        else:
            class_names = sorted(set(raw_labels))
            index = {name: i for i, name in enumerate(class_names)}
            labels = [index[label] for label in raw_labels]
        keys = [path for path, _ in entries]
        return Source("list", source_root(source), RootedPaths(source_root(source), keys), keys, labels, class_names)
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
