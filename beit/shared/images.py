"""Finding source images: a folder (searched recursively) or a text file listing paths."""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def list_images(source: Path) -> list[Path]:
    """Image files under a folder (sorted, recursive) or listed in a text file (one path per
    line, relative to the file's folder; blank lines and '#' comments skipped)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    elif source.is_file() and source.suffix.lower() in {".txt", ".lst", ".list"}:
        files = []
        for line in source.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                path = Path(line.split()[0])
                files.append(path if path.is_absolute() else source.parent / path)
    elif source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
        files = [source]
    else:
        raise ValueError(f"{source} is neither a folder of images nor a .txt file listing them: check the path.")
    if not files:
        raise ValueError(f"{source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): check the path.")
    return files
