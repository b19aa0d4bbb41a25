"""Finding source images: an ImageFolder tree, a flat folder, or a text file listing paths."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Source:
    """The images of a data set, in a fixed order, with labels (-1 = none)."""

    kind: str  # "imagefolder" | "folder" | "list"
    root: Path
    files: list[Path]
    keys: list[str]  # path relative to root (or as listed), the stable name of each image
    labels: list[int]
    class_names: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        """sha256 over the sorted relative paths and file sizes (-1 for a missing file)."""
        digest = hashlib.sha256()
        for key, path in sorted(zip(self.keys, self.files, strict=True)):
            try:
                size = path.stat().st_size
            except OSError:
                size = -1
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


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_source(source: Path) -> Source:
    """An ImageFolder tree (every image inside a class sub-folder: labels from the sorted
    sub-folder names), a flat folder (searched recursively, no labels), or a text file with one
    `path [label]` per line (paths relative to the file's folder; labels integers or class names)."""
    source = Path(source)
    if source.is_dir():
        files = _images_under(source)
        if not files:
            raise ValueError(f"{source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): check the path.")
        keys = [p.relative_to(source).as_posix() for p in files]
        if all("/" in k for k in keys):
            class_names = sorted({k.split("/", 1)[0] for k in keys})
            index = {name: i for i, name in enumerate(class_names)}
            labels = [index[k.split("/", 1)[0]] for k in keys]
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
        files = [Path(k) if Path(k).is_absolute() else source.parent / k for k in keys]
        return Source("list", source.parent, files, keys, labels, class_names)
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
