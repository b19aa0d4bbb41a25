"""Object storage, against a real S3-compatible server the test starts on 127.0.0.1 (moto's
`moto_server`), read and written through s3fs, never a mock of the client: an s3:// source and
an s3:// store through tokenize, verify, pre-training and a resume after SIGKILL; bad URLs."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import COLOUR, GREY, beit_here, copy_photos, free_port, kill_when, save_jpeg, tiny_tokenizer

from beit.shared.store import DONE, FAILED, TokenStore

pytest.importorskip("zarr")
s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto")

SMALL = ["--views", "2", "--set", "view.image_size=64", "--set", "chunk_images=4", "--batch-size", "4"]
PRETRAIN = [
    "--model", "tiny", "--set", "model.width=64", "--set", "model.heads=2", "--set", "model.depth=2",
    "--batch-size", "4", "--lr", "1e-3", "--warmup-epochs", "1", "--epochs", "6",
    "--set", "log_every=1", "--set", "checkpoint_every=4",
]  # fmt: skip


def start_server(log: Path, **settings: str) -> tuple[subprocess.Popen, str]:
    """`python -m moto.server` on a free port of 127.0.0.1 (with `settings` in its environment),
    once it answers: (the process, its endpoint URL)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **settings},
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return process, endpoint
        except urllib.error.HTTPError:  # it answers (a server that checks credentials refuses the probe)
            return process, endpoint
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A moto S3 server, and the environment that points s3fs (and every `beit` subprocess) at
    it; the server stops with the module."""
    process, endpoint = start_server(tmp_path_factory.mktemp("moto") / "server.log")
    settings = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    yield s3fs.S3FileSystem(skip_instance_cache=True)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def photos(server, tmp_path_factory):
    """An ImageFolder tree of 12 photos in two classes, on local disk and in s3://photos/train."""
    root = tmp_path_factory.mktemp("s3data")
    local = root / "train"
    for name, names in (("colour", COLOUR[:6]), ("grey", GREY[:6])):
        (local / name).mkdir(parents=True)
        for path in copy_photos(root / "raw", names):
            save_jpeg(path, local / name / f"{path.stem}.jpg", 96)
    server.mkdir("photos")
    server.put(str(local), "photos/", recursive=True)
    return local, tiny_tokenizer(root / "tok.safetensors")


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_an_s3_source_and_store_tokenize_verify_and_pretrain_with_a_resume(server, photos, tmp_path):
    local, tokenizer = photos
    assert sorted(server.find("photos/train")) == sorted(
        f"photos/train/{p.relative_to(local).as_posix()}" for p in local.rglob("*.jpg")
    )
    server.mkdir("stores")
    result = beit_here("tokenize", "s3://photos/train", "s3://stores/run1", "--tokenizer", tokenizer, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokenized 12 of 12 images" in result.stdout
    assert server.exists("stores/run1/zarr.json") and server.exists("stores/run1.metrics.json")
    # the same images from the local folder: the same keys, labels and tokens
    assert beit_here("tokenize", local, tmp_path / "local", "--tokenizer", tokenizer, *SMALL).returncode == 0
    remote, here = TokenStore.open("s3://stores/run1"), TokenStore.open(tmp_path / "local")
    assert remote.keys() == here.keys() and remote.source_root == "s3://photos/train"
    assert remote.source_fingerprint == here.source_fingerprint  # the listing's sizes are the files' sizes
    for name in ("tokens", "view_params", "labels", "image_sizes"):
        assert np.array_equal(getattr(remote, name)(), getattr(here, name)()), name
    verify = beit_here("store", "verify", "s3://stores/run1", "--sample", "6")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "100.00% of tokens" in verify.stdout

    whole = tmp_path / "whole"
    result = beit_here("pretrain", "s3://stores/run1", "--out", whole, *PRETRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    cut = tmp_path / "cut"
    command = [sys.executable, "-m", "beit", "pretrain", "s3://stores/run1", "--out", cut, *PRETRAIN]

    def past_the_first_checkpoint() -> bool:
        return json.loads((cut / "checkpoint.json").read_text())["step"] >= 4

    assert kill_when(command, past_the_first_checkpoint) == -signal.SIGKILL
    assert json.loads((cut / "checkpoint.json").read_text())["step"] < 18  # 12 images, 4 a step: 3 a epoch
    result = beit_here("pretrain", "s3://stores/run1", "--out", cut, *PRETRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in metrics(cut)] == list(range(1, 19))
    assert [r["loss"] for r in metrics(cut)] == [r["loss"] for r in metrics(whole)]
    # fine-tuning from the store at its URL reads the images from the bucket too
    tiny = ["--model", "tiny", "--set", "model.image_size=64", "--set", "model.width=64", "--set", "model.heads=2"]
    tiny += ["--set", "model.depth=2", "--batch-size", "4", "--epochs", "1", "--set", "warmup_epochs=0"]
    result = beit_here("finetune", "s3://stores/run1", "--init", "none", "--out", tmp_path / "ft", *tiny)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fine-tuned 2 steps" in result.stdout  # 12 images less a tenth held out (one per class): 10, 4 a step


def test_a_list_at_a_url_with_urls_in_it_and_bad_input(server, photos, tmp_path):
    local, tokenizer = photos
    keys = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.jpg"))
    keys = keys[:2] + keys[-2:]  # two of each class
    lines = [f"s3://photos/train/{k} {k.split('/')[0]}" for k in keys] + ["s3://photos/train/colour/gone.jpg colour"]
    server.pipe("photos/lists/some.txt", ("\n".join(lines) + "\n").encode())
    result = beit_here("tokenize", "s3://photos/lists/some.txt", tmp_path / "listed", "--tokenizer", tokenizer, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    store = TokenStore.open(tmp_path / "listed")
    assert list(store.status()) == [DONE] * 4 + [FAILED] and store.class_names == ["colour", "grey"]
    assert store.failures() == [("s3://photos/train/colour/gone.jpg", "unreadable: no such object")]
    # a bucket that does not exist: one sentence, nothing written
    result = beit_here("tokenize", "s3://no-such-bucket/train", tmp_path / "x", "--tokenizer", tokenizer, *SMALL)
    assert result.returncode == 1 and "s3://no-such-bucket/train does not exist: check the URL" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()
    # a list line that is not a path to an image
    server.pipe("photos/lists/bad.txt", b"s3://photos/train/colour/astronaut.jpg\nn01440764\n")
    result = beit_here("tokenize", "s3://photos/lists/bad.txt", tmp_path / "y", "--tokenizer", tokenizer, *SMALL)
    assert (
        result.returncode == 1 and "s3://photos/lists/bad.txt:2: 'n01440764' is not a path to an image" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_a_server_that_denies_access_is_one_sentence(server, photos, tmp_path):
    """A server that checks credentials (moto enforcing IAM from its first request) refuses the
    test's keys: the source cannot be read, said in one sentence naming the URL and the fix."""
    _, tokenizer = photos
    process, endpoint = start_server(tmp_path / "server.log", INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        env = {**os.environ, "AWS_ENDPOINT_URL": endpoint}
        command = [sys.executable, "-m", "beit", "tokenize", "s3://photos/train", str(tmp_path / "s")]
        command += ["--tokenizer", str(tokenizer), *SMALL]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "s3://photos/train cannot be read (access denied): check the credentials" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "s").exists()


def test_tar_shards_in_a_bucket_are_read_by_ranged_reads(server, photos, tmp_path):
    """The same two shards on local disk and in the bucket make the same store; stage 2 reads
    the images back from the bucket's shards."""
    local, tokenizer = photos
    files = sorted(local.rglob("*.jpg"))
    for s in range(2):
        with tarfile.open(tmp_path / f"shards-{s:06d}.tar", "w") as tar:
            for path in files[6 * s : 6 * s + 6]:
                tar.add(path, arcname=path.relative_to(local).as_posix())
        server.put(str(tmp_path / f"shards-{s:06d}.tar"), f"photos/shards/shards-{s:06d}.tar")
    pattern = "shards-{000000..000001}.tar"
    remote = f"s3://photos/shards/{pattern}"
    result = beit_here("tokenize", remote, tmp_path / "remote", "--tokenizer", tokenizer, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    result = beit_here("tokenize", tmp_path / pattern, tmp_path / "here", "--tokenizer", tokenizer, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    remote, here = TokenStore.open(tmp_path / "remote"), TokenStore.open(tmp_path / "here")
    assert remote.source_root == "s3://photos/shards" and remote.keys() == here.keys()
    assert remote.keys()[0] == f"shards-000000.tar/{files[0].relative_to(local).as_posix()}"
    for name in ("tokens", "status", "image_sizes"):
        assert np.array_equal(getattr(remote, name)(), getattr(here, name)()), name
    assert all(status == DONE for status in remote.status())
    item = remote.items([7])[0]
    assert str(item.shard) == "s3://photos/shards/shards-000001.tar" and item.size == files[7].stat().st_size
