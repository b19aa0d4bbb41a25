"""Every input accounted for: fine-tuning, evaluation, probing and segmentation (train, evaluate,
predict) on real folders holding real broken files (an empty .jpg, a text file named .png, a
truncated JPEG) say how many images were listed, read and skipped, write the skipped with their
reasons, state what a metric is over, and stop a run whose images are mostly unreadable."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import COLOUR, GREY, beit_here, beit_torchrun, copy_photos, save_jpeg, the_error
from PIL import Image

from beit.shared.checkpoint import save_checkpoint
from beit.shared.inputs import MAX_SKIPPED_FRACTION
from beit.shared.preempt import PREEMPTED
from beit.train.model import BeitForMIM, ModelConfig

MODEL = dict(preset="tiny", image_size=32, width=48, heads=2, depth=1, vocab_size=64)
MODEL_ARGS = [
    "--model",
    "tiny",
    *[f"--set=model.{k}={v}" for k, v in MODEL.items() if k not in ("preset", "vocab_size")],
]
BROKEN = ("empty.jpg", "text.png", "truncated.jpg")


def break_into(folder, photo):
    """The three broken files in `folder`: a zero-byte JPEG, a text file named .png, and `photo` cut short."""
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("meeting notes, not a picture\n")
    (folder / "truncated.jpg").write_bytes(photo.read_bytes()[:700])


def skipped_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """train/ 9 photos + 3 broken (12: whole batches of 4), val/ 4 photos + 3 broken, both in
    colour/ and grey/; a folder of 12 empty files (a copy that never arrived); a stand-in
    pre-trained model."""
    root = tmp_path_factory.mktemp("inputs")
    raw = copy_photos(root / "raw", COLOUR[:7] + GREY[:6])
    for i, path in enumerate(raw):
        split = "val" if i in (0, 1, 7, 8) else "train"
        folder = root / "data" / split / ("colour" if i < 7 else "grey")
        folder.mkdir(parents=True, exist_ok=True)
        save_jpeg(path, folder / f"{path.stem}.jpg", 40)
    photo = next((root / "data" / "train" / "colour").iterdir())
    break_into(root / "data" / "train" / "grey", photo)
    break_into(root / "data" / "val" / "colour", photo)
    for split in ("train", "val"):
        for name in ("colour", "grey"):
            (root / "unarrived" / split / name).mkdir(parents=True)
            for i in range(6):
                (root / "unarrived" / split / name / f"{i}.jpg").write_bytes(b"")
    torch.manual_seed(0)
    pretrained = root / "pt.pt"
    save_checkpoint(pretrained, {"model": BeitForMIM(ModelConfig(**MODEL)).state_dict()}, {"kind": "pretrain"})
    return root / "data", root / "unarrived", pretrained


@pytest.fixture(scope="module")
def finetuned(folders, tmp_path_factory):
    data, _, pretrained = folders
    run = tmp_path_factory.mktemp("ft") / "run"
    args = [
        *MODEL_ARGS,
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--set",
        "max_skipped_fraction=0.5",
        "--set",
        "randaugment=false",
    ]
    result = beit_here("finetune", data, "--init", pretrained, "--out", run, *args)
    return run, result


def test_fine_tuning_counts_and_records_what_it_could_not_read(folders, finetuned):
    data, _, _ = folders
    run, result = finetuned
    assert result.returncode == 0, result.stderr[-3000:]
    log = run / "skipped.jsonl"
    assert f"train images: listed 12, read 9, skipped 3 (see {log})" in result.stdout
    assert f"val images: listed 7, read 4, skipped 3 (see {log})" in result.stdout
    assert f"over 4 of 7 listed images (3 unreadable, see {log})" in result.stdout
    entries = {(e["split"], e["path"]): e["reason"] for e in skipped_lines(log)}
    assert len(entries) == 6  # each once, though val was read at the evaluation and the end
    train = data / "train" / "grey"
    assert entries["train", str(train / "empty.jpg")] == "empty file"
    assert entries["train", str(train / "text.png")] == "not an image (unknown file signature)"
    assert "truncated" in entries["train", str(train / "truncated.jpg")]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["eval_images"], r["eval_skipped"]) for r in evals if "eval_top1" in r] == [(4, 3)]


def test_evaluate_says_what_its_figures_are_over(folders, finetuned, tmp_path):
    """The issue's example: a validation folder with broken files next to its images."""
    data, _, _ = folders
    run, _ = finetuned
    figures = tmp_path / "figures.json"
    result = beit_here("evaluate", run / "best.pt", data / "val", "--json", figures)
    assert result.returncode == 0, result.stderr[-3000:]
    log = tmp_path / "figures.skipped.jsonl"
    assert f"over 4 of 7 listed images (3 unreadable, see {log})" in result.stdout.splitlines()[0]
    assert f"listed 7, read 4, skipped 3 (see {log})" in result.stdout
    record = json.loads(figures.read_text())
    assert (record["listed"], record["read"], record["skipped"]) == (7, 4, 3) and 0 <= record["top1"] <= 1
    reasons = {e["path"]: e["reason"] for e in skipped_lines(log)}
    assert set(reasons) == {str(data / "val" / "colour" / name) for name in BROKEN}
    # without --json there is no file: the skipped images are named on the terminal
    result = beit_here("evaluate", run / "best.pt", data / "val")
    assert result.returncode == 0 and "listed 7, read 4, skipped 3" in result.stdout
    assert f"  skipped {data / 'val' / 'colour' / 'empty.jpg'}: empty file" in result.stdout


def test_a_folder_of_unreadable_files_stops_with_one_sentence(folders, finetuned, tmp_path):
    data, unarrived, pretrained = folders
    run, _ = finetuned
    result = beit_here("evaluate", run / "best.pt", unarrived / "val")
    assert result.returncode == 1 and the_error(result.stderr)
    assert "could not be read (100%, more than max_skipped_fraction 0.05" in result.stderr
    assert (
        f"12 of the 12 images of {unarrived / 'val'} tried so far" in result.stderr
        and "--max-skipped-fraction" in result.stderr
    )
    # with the limit raised it reads to the end, where nothing was read
    result = beit_here("evaluate", run / "best.pt", unarrived / "val", "--max-skipped-fraction", "1")
    assert result.returncode == 1 and "none of the 12 images" in result.stderr
    # a training batch of none stops fine-tuning at once, as one sentence too
    args = [*MODEL_ARGS, "--batch-size", "4", "--epochs", "1", "--set", "max_skipped_fraction=1"]
    result = beit_here("finetune", unarrived, "--init", pretrained, "--out", tmp_path / "r", *args)
    assert result.returncode == 1 and the_error(result.stderr)
    assert "none of the 4 images of a training batch of" in result.stderr
    assert "empty file" in (tmp_path / "r" / "skipped.jsonl").read_text()


def test_a_rank_that_meets_unreadable_images_stops_every_rank_with_it(folders, tmp_path):
    """Under torchrun each rank reads its own share of the training images, and rank 0 alone
    evaluates. A rank that stops alone leaves the others waiting in an all-reduce for it: every rank
    must stop at the same step, each with one sentence and nothing else."""
    from beit.train.classify.data import ClassificationData, read_splits

    data, _, pretrained = folders
    args = [*MODEL_ARGS, "--batch-size", "2", "--epochs", "1", "--set", "randaugment=false"]

    def two_ranks(folder):
        result = beit_torchrun(2, "finetune", folder, "--init", pretrained, "--out", folder / "run", *args, timeout=300)
        errors = re.findall(r"error: [^\n]*", result.stderr)  # (a progress bar may stand before one)
        assert result.returncode != 0 and len(errors) == 2, result.stderr[-3000:]
        assert "Error: " not in result.stderr.replace("ChildFailedError", ""), result.stderr[-3000:]  # no other
        return errors

    # rank 1's first training batch is all unreadable, rank 0's all readable: both stop at step 1
    shutil.copytree(data, tmp_path / "train")
    train, _ = read_splits(tmp_path / "train")
    good = next(f for f in train.files if f.suffix == ".jpg" and f.stat().st_size > 1000).read_bytes()
    for rank in (0, 1):
        for index in ClassificationData(train, 32, 2, True, rank=rank, world=2).indices(0):
            train.files[index].write_bytes(b"" if rank else good)
    errors = two_ranks(tmp_path / "train")
    assert any(e.startswith("error: none of the 2 images of a training batch of") for e in errors), errors
    assert "error: rank 1 stopped the run: too many of its training images could not be read" in errors[0] + errors[1]
    assert "loss" not in (tmp_path / "train" / "run" / "metrics.jsonl").read_text()  # no step was logged
    # every validation image is unreadable: rank 0's evaluation stops both ranks, with its sentence
    shutil.copytree(data, tmp_path / "val")
    for name in BROKEN:
        (tmp_path / "val" / "train" / "grey" / name).unlink()  # training reads every image
    for path in (tmp_path / "val" / "val").rglob("*.*"):
        path.write_bytes(b"")
    errors = two_ranks(tmp_path / "val")
    assert errors[0] == errors[1] and "7 of the 7 images of" in errors[0] and "(100%" in errors[0], errors


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` now (its SigCgt mask in /proc)."""
    status = open(f"/proc/{pid}/status").read()
    return bool(int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16) & (1 << (sig - 1)))


def stopped_by(sig: int, *args) -> tuple[int, str]:
    """`beit ARGS` in a process, `sig` sent once the command has taken its stop signals: (exit code, stderr)."""
    process = subprocess.Popen([sys.executable, "-m", "beit", *map(str, args)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while process.poll() is None and not catches(process.pid, sig) and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


def test_evaluate_and_probe_stop_at_the_next_batch_on_a_signal(folders, finetuned, tmp_path):
    """Commands that keep nothing between runs still stop inside a scheduler's grace period: at the
    next batch (or epoch of the probe's classifier), with exit 75 and one sentence."""
    data, _, pretrained = folders
    run, _ = finetuned
    photo = next((data / "val" / "grey").iterdir()).read_bytes()
    for name in ("colour", "grey"):
        (tmp_path / "many" / "train" / name).mkdir(parents=True)
        (tmp_path / "many" / "val" / name).mkdir(parents=True)
        for i in range(20):
            (tmp_path / "many" / "val" / name / f"{i}.jpg").write_bytes(photo)
            (tmp_path / "many" / "train" / name / f"{i}.jpg").write_bytes(photo)
    code, stderr = stopped_by(signal.SIGTERM, "evaluate", run / "best.pt", tmp_path / "many" / "val", "--batch-size", 1)
    assert code == PREEMPTED and "received SIGTERM: stopping at the next batch" in stderr, stderr[-3000:]
    assert re.search(r"stopped by SIGTERM after \d+ of the 40 images; beit evaluate keeps nothing between runs: run "
                     "the same command again", stderr), stderr[-3000:]  # fmt: skip
    args = ["probe", tmp_path / "many", "--init", pretrained, *MODEL_ARGS, "--layer", "1", "--epochs", "100000"]
    code, stderr = stopped_by(signal.SIGUSR1, *args)
    assert code == PREEMPTED and "beit probe keeps nothing between runs" in stderr, stderr[-3000:]
    assert re.search(r"stopped by SIGUSR1 (after \d+ of the 40 images|at epoch \d+ of 100000)", stderr), stderr


def test_probe_names_the_images_it_skipped(folders):
    data, _, pretrained = folders
    result = beit_here("probe", data, "--init", pretrained, *MODEL_ARGS, "--layer", "1", "--epochs", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train images: listed 12, read 9, skipped 3" in result.stdout
    assert "val images: listed 7, read 4, skipped 3" in result.stdout
    assert f"  skipped {data / 'train' / 'grey' / 'text.png'}: not an image" in result.stdout
    assert "linear probe on 9 train / 4 val images" in result.stdout


SEGMENT = [
    "--crop", "32", "--batch-size", "4", "--model", "tiny", "--set", "model.width=48", "--set", "model.heads=2",
    "--set", "model.depth=4", "--set", "aux_channels=8", "--set", "scale=[64,32]", "--set", "warmup_iters=1",
]  # fmt: skip


def test_segmentation_train_evaluate_and_predict_account_for_every_image(tmp_path):
    scenes = tmp_path / "scenes"
    result = beit_here("data", "fashion-scenes", scenes, "--train", 8, "--val", 3, "--sides", "32,40")
    assert result.returncode == 0, result.stderr[-3000:]
    for split in ("training", "validation"):
        images, masks = scenes / "images" / split, scenes / "annotations" / split
        photo = sorted(images.glob("*.png"))[0]
        Image.open(photo).convert("RGB").save(tmp_path / "scene.jpg", quality=90)
        break_into(images, tmp_path / "scene.jpg")
        for name in BROKEN:  # each broken image has a good mask, of the photo's size
            shutil.copy(masks / f"{photo.stem}.png", masks / f"{name.rsplit('.', 1)[0]}.png")
    run = tmp_path / "run"
    result = beit_here("segment", "train", scenes, "--init", "none", "--out", run, *SEGMENT, "--iters", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    log = run / "skipped.jsonl"
    # the empty and the text file fail at listing (their headers), the truncated one when decoded
    assert f"val images: listed 6, read 3, skipped 3 (see {log})" in result.stdout
    assert f"over 3 of 6 listed images (3 unreadable, see {log})" in result.stdout
    # training decoded 8 of the 9 readable at listing, and what it prepared ahead: the truncated one may be
    # among those it did not come to
    line = next(line for line in result.stdout.splitlines() if line.startswith("train images:"))
    counts = {name: int(n) for name, n in re.findall(r"(listed|read|skipped|not reached) (\d+)", line)}
    assert counts["listed"] == 11 and counts["skipped"] in (2, 3), line
    assert counts["read"] + counts["skipped"] + counts.get("not reached", 0) == 11, line
    entries = {(e["split"], e["path"]): e["reason"] for e in skipped_lines(log)}
    validation = scenes / "images" / "validation"
    assert entries["val", str(validation / "empty.jpg")] == "empty file"
    assert entries["val", str(validation / "text.png")] == "not an image (unknown file signature)"
    assert "truncated" in entries["val", str(validation / "truncated.jpg")]

    figures = tmp_path / "seg.json"
    result = beit_here("segment", "evaluate", run / "best.pt", scenes, "--mode", "whole", "--json", figures)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "over 3 of 6 listed images (3 unreadable" in result.stdout.splitlines()[0]
    record = json.loads(figures.read_text())
    assert (record["listed"], record["read"], record["skipped"]) == (6, 3, 3)
    assert len(skipped_lines(tmp_path / "seg.skipped.jsonl")) == 3

    masks = tmp_path / "masks"
    images = sorted(validation.iterdir())
    result = beit_here("segment", "predict", run / "best.pt", *images, "-o", masks)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote 3 masks under {masks}" in result.stdout
    assert f"listed 6, read 3, skipped 3 (see {masks / 'skipped.jsonl'})" in result.stdout
    reasons = {e["path"]: e["reason"] for e in skipped_lines(masks / "skipped.jsonl")}
    assert (
        reasons[str(validation / "empty.jpg")] == "empty file"
        and "truncated" in reasons[str(validation / "truncated.jpg")]
    )


def test_every_command_has_the_same_default_limit():
    from beit.cli import MAX_SKIPPED
    from beit.train.classify.finetune import FinetuneConfig
    from beit.train.classify.probe import ProbeConfig
    from beit.train.segment.trainer import SegmentConfig
    from beit.train.tokenizer.trainer import DVAETrainConfig

    configs = (FinetuneConfig, ProbeConfig, SegmentConfig, DVAETrainConfig)
    assert {MAX_SKIPPED, *(config().max_skipped_fraction for config in configs)} == {MAX_SKIPPED_FRACTION}
