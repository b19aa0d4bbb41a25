"""Real photos that install with scikit-image (skimage/data), for tests that need real images."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

COLOUR = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "motorcycle_right.png",
]
GREY = ["camera.png", "brick.png", "grass.png", "gravel.png", "moon.png", "coins.png", "page.png"]


def data_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is not installed: run `make test` (scripts/setup.sh dev) to set up.")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def copy_photos(dest: Path, names: list[str]) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(data_dir() / name, dest / name)) for name in names]
