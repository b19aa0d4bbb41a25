"""Object storage that fails rather than stalls: `beit tokenize` from an s3:// source into an s3://
store through a fault-injecting proxy (`faulty_proxy.py`) in front of a real S3 server (moto),
never a mock of the client. Faults that pass are tried again and change nothing in the store;
one that outlasts the tries stops the command with one sentence naming the object, and the same
command run again finishes the store where it stopped. The tries are few and short here
(BEIT_STORAGE_*), each loop bounded by count and by time."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faulty_proxy import FaultyProxy
from helpers import COLOUR, GREY, assert_same_store, beit_here, copy_photos, save_jpeg, the_error, tiny_tokenizer
from test_s3 import start_server

pytest.importorskip("zarr")
s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto")

SMALL = ["--views", "2", "--set", "view.image_size=64", "--set", "chunk_images=2", "--batch-size", "2"]
RETRIES = {  # 5 tries 0.1 s apart at first, doubling: a fault that lasts past about 1.5 s outlasts them
    "BEIT_STORAGE_TRIES": "5",
    "BEIT_STORAGE_WAIT": "0.1",
    "BEIT_STORAGE_SECONDS": "20",
    "BEIT_STORAGE_TIMEOUT": "2",
}
IMAGES = r"^/photos/train/.*\.jpg$"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    """moto on 127.0.0.1 behind the proxy; the environment points s3fs (and `beit`) at the proxy."""
    process, endpoint = start_server(tmp_path_factory.mktemp("moto") / "server.log")
    proxy = FaultyProxy(endpoint)
    settings = {
        "AWS_ENDPOINT_URL": proxy.start(),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        **RETRIES,
    }
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    s3fs.S3FileSystem.clear_instance_cache()  # none made for another endpoint is reused
    yield proxy
    s3fs.S3FileSystem.clear_instance_cache()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    proxy.close()
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def photos(proxy, tmp_path_factory):
    """6 small photos in two classes in s3://photos/train, the tokenizer, the keys in store order,
    and the store tokenized with no fault (s3://stores/clean)."""
    root = tmp_path_factory.mktemp("s3faults")
    local = root / "train"
    for name, names in (("colour", COLOUR[:3]), ("grey", GREY[:3])):
        (local / name).mkdir(parents=True)
        for path in copy_photos(root / "raw", names):
            save_jpeg(path, local / name / f"{path.stem}.jpg", 48)
    bucket = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket.mkdir("photos")
    bucket.mkdir("stores")
    bucket.put(str(local), "photos/", recursive=True)
    tokenizer = tiny_tokenizer(root / "tok.safetensors")
    result = beit_here("tokenize", "s3://photos/train", "s3://stores/clean", "--tokenizer", tokenizer, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    keys = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.jpg"))
    return tokenizer, keys


def tokenize(tokenizer: Path, store: str):
    return beit_here("tokenize", "s3://photos/train", store, "--tokenizer", tokenizer, *SMALL)


@pytest.mark.parametrize(
    "kind, fault",
    [
        ("refuse", {"seconds": 0.6}),  # from the first request on, nothing listens on the port for 0.6 s
        ("reset", {"times": 3, "method": "GET", "path": IMAGES}),
        ("slowdown", {"times": 4, "method": "PUT", "path": r"^/stores/slowdown/.*/c/"}),  # chunk writes
        ("internal", {"times": 4, "method": "GET", "path": IMAGES}),
        ("slow", {"times": 6, "method": "GET", "path": IMAGES, "trickle": 0.1}),
        ("truncate", {"times": 3, "method": "GET", "path": IMAGES}),
    ],
)
def test_a_fault_that_passes_is_tried_again_and_changes_nothing(proxy, photos, kind, fault):
    tokenizer, _ = photos
    proxy.inject(kind, **fault)
    started = time.monotonic()
    result = tokenize(tokenizer, f"s3://stores/{kind}")
    proxy.clear()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokenized 6 of 6 images" in result.stdout and "0 failed" in result.stdout
    assert proxy.hits == fault.get("times", 1)  # the fault met the command
    assert_same_store("s3://stores/clean", f"s3://stores/{kind}")
    assert time.monotonic() - started < 60


def test_a_fault_that_outlasts_the_tries_stops_in_one_sentence_and_a_rerun_resumes(proxy, photos):
    """First an image of the second chunk whose body always comes short (never taken for a short
    image), then the third chunk's status that cannot be written (503 SlowDown on every try): each
    run writes the chunks before the fault and stops naming the object; run again, it goes on from
    there (no chunk written twice), and once the fault is gone the store equals one made with none."""
    tokenizer, keys = photos
    store = "s3://stores/outlast"
    faults = [
        ("truncate", "GET", f"/photos/train/{keys[2]}", "the answer ended before its announced length"),
        ("slowdown", "PUT", "/stores/outlast/status/c/2", "503 SlowDown"),
    ]
    written: list[str] = []
    for kind, method, target, why in faults:
        proxy.inject(kind, seconds=120, method=method, path=f"^{target}$")
        before, started = len(proxy.requests), time.monotonic()
        result = tokenize(tokenizer, store)
        spent = time.monotonic() - started
        proxy.clear()
        assert result.returncode == 1, result.stdout + result.stderr[-3000:]
        assert the_error(result.stderr)
        assert f"s3:/{target}: " in result.stderr and f"({why}) on 5 tries over " in result.stderr, result.stderr
        assert "run the same command again" in result.stderr and "resumes" in result.stderr
        assert proxy.hits == 5 and spent < 30  # stopped by count, well inside the time bound
        puts = [path for m, path in proxy.requests[before:] if m == "PUT" and "/status/c/" in path]
        assert not set(puts) & set(written), puts  # a chunk written before is not written again
        written += [path for path in puts if path != target]
    assert written == ["/stores/outlast/status/c/0", "/stores/outlast/status/c/1"]
    result = tokenize(tokenizer, store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokenized 6 of 6 images" in result.stdout and "0 failed" in result.stdout
    assert_same_store("s3://stores/clean", store)


def test_an_outage_of_every_request_mid_run_stops_the_command_in_its_bound_and_a_rerun_resumes(proxy, photos):
    """From the first chunk's status on, every request answered 503 SlowDown: the command stops
    within its bound in one sentence (its reading thread, busy with the same failing storage,
    does not hold it open), keeping the chunk it wrote; run again once the storage answers, it
    finishes the store."""
    tokenizer, _ = photos
    store = "s3://stores/outage"
    proxy.inject("slowdown", seconds=120, after=r"^PUT /stores/outage/status/c/0$")
    started = time.monotonic()
    result = tokenize(tokenizer, store)
    spent = time.monotonic() - started
    proxy.clear()
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert the_error(result.stderr)
    assert re.search(
        r"s3://stores/outage/\S+: \w+ it failed \((503 SlowDown|HTTP 503)\) on 5 tries over ", result.stderr
    )
    assert "run the same command again" in result.stderr, result.stderr
    assert proxy.hits >= 5 and spent < 40, (proxy.hits, spent)  # 5 short tries each: not the 120 s outage
    result = tokenize(tokenizer, store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_store("s3://stores/clean", store)


PRETRAIN = [
    "--model", "tiny", "--set", "model.width=48", "--set", "model.heads=2", "--set", "model.depth=1",
    "--batch-size", "4", "--epochs", "10", "--set", "warmup_epochs=1",
    "--set", "log_every=1", "--set", "checkpoint_every=2",
]  # fmt: skip


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_pretraining_from_an_s3_store_waits_out_faults_and_resumes_after_one_that_lasts(proxy, photos, tmp_path):
    """Pre-training reads the store and the photos through the same bounded retries as stage 1:
    resets and 500s of the photos' GETs pass and change no loss; an outage that starts after the
    first checkpoint stops it in one sentence naming the object, and the same command run again
    resumes from that checkpoint to the losses of a run that met no fault."""
    store = "s3://stores/clean"
    whole, faulted, cut = tmp_path / "whole", tmp_path / "faulted", tmp_path / "cut"
    assert beit_here("pretrain", store, "--out", whole, *PRETRAIN).returncode == 0
    # three photos' bodies cut short (never decoded as short images): tried again, the same losses
    proxy.inject("truncate", times=3, method="GET", path=IMAGES)
    result = beit_here("pretrain", store, "--out", faulted, *PRETRAIN)
    proxy.clear()
    assert result.returncode == 0 and proxy.hits == 3, result.stderr[-3000:]
    assert losses(faulted) == losses(whole) and len(losses(whole)) == 10  # 6 photos, 4 a step: 1 step an epoch
    # every photo answered 500 from the first checkpoint on: one sentence; run again, it resumes
    command = [sys.executable, "-m", "beit", "pretrain", store, "--out", cut, *PRETRAIN]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (cut / "checkpoint.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proxy.inject("internal", seconds=120, method="GET", path=IMAGES)
    _, stderr = process.communicate(timeout=120)
    proxy.clear()
    assert process.returncode == 1 and the_error(stderr)
    assert re.search(r"s3://photos/train/\S+\.jpg: .*\(500 InternalError|HTTP 500\) on 5 tries over ", stderr), stderr
    assert "run the same command again" in stderr and proxy.hits >= 5
    saved = json.loads((cut / "checkpoint.json").read_text())["step"]
    assert 2 <= saved < 10, saved
    result = beit_here("pretrain", store, "--out", cut, *PRETRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(cut) == losses(whole)
