import os

import pytest
import torch

# Under pytest-xdist (`-n 2`, as `make test` runs) each worker gets one of the cores: torch in the
# worker, and every command a test starts (they inherit the environment), compute on one thread,
# so two workers never fight over the same two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
from helpers import COLOUR, GREY, STAGE1_SMALL, beit_here, copy_photos, save_jpeg, tiny_tokenizer


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Shared by the stage 1 and store tests (made once per test run): an ImageFolder tree of 12 real
# photos and a tokenizer, and the store `beit tokenize` makes of them at STAGE1_SMALL.


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def reference(data, tmp_path_factory):
    source, tokenizer = data
    store = tmp_path_factory.mktemp("ref") / "store"
    result = beit_here("tokenize", source, store, "--tokenizer", tokenizer, *STAGE1_SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    return store, result.stdout
