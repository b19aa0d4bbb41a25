"""`--set tensorboard=true`: every trainer writes TensorBoard event files into its run folder, the
scalars of metrics.jsonl at the same steps and its pictures, read back here with TensorBoard's own
reader; a resumed run shows each step once."""

import json
import signal
import sys

import pytest
from helpers import beit_here, kill_when

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TINY = ["--model", "tiny", "--set", "model.width=64", "--set", "model.heads=2", "--set", "model.depth=2"]


def events(run) -> EventAccumulator:
    board = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    return board


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def same_scalars(run, keys) -> None:
    """Every `keys` value of metrics.jsonl is in the event files at its step, once (float32)."""
    board = events(run)
    for key in keys:
        logged = [(r["step"], r[key]) for r in rows(run) if key in r]
        shown = [(e.step, e.value) for e in board.Scalars(key)]
        assert logged and [s for s, _ in shown] == [s for s, _ in logged], key
        assert all(abs(a - b) <= 1e-6 * max(1.0, abs(a)) for (_, a), (_, b) in zip(logged, shown, strict=True)), key


def test_pretraining_writes_its_scalars_and_pictures_and_a_resume_shows_each_step_once(reference, tmp_path):
    store = reference[0]
    args = [*TINY, "--batch-size", "4", "--epochs", "6", "--lr", "1e-3", "--warmup-epochs", "1"]
    args += ["--set", "log_every=1", "--set", "checkpoint_every=3", "--set", "tensorboard=true"]
    run = tmp_path / "run"
    command = [sys.executable, "-m", "beit", "pretrain", store, "--out", run, *args]

    def past_the_first_checkpoint() -> bool:
        return json.loads((run / "checkpoint.json").read_text())["step"] >= 3

    assert kill_when(command, past_the_first_checkpoint) == -signal.SIGKILL  # 12 images, 4 a step: 18 steps
    result = beit_here("pretrain", store, "--out", run, *args)
    assert result.returncode == 0 and "resuming from" in result.stdout, result.stderr[-3000:]
    assert [r["step"] for r in rows(run)] == list(range(1, 19))
    same_scalars(run, ("loss", "lr", "mim_accuracy", "grad_norm", "images_per_s"))
    board = events(run)
    (tag,) = board.Tags()["images"]
    pictures = board.Images(tag)
    assert [p.step for p in pictures][-2:] == [15, 18]  # at every checkpoint, the resumed run's too
    # 4 rows of 5 panels of 96 px (view, masked, right/wrong, the targets' and the predictions' reconstructions)
    assert (pictures[-1].width, pictures[-1].height) == (5 * 96, 4 * 100)


def test_fine_tuning_segmentation_and_the_tokenizer_write_their_scalars(data, tmp_path):
    source, _ = data
    classes = tmp_path / "classes"
    classes.mkdir()
    for split in ("train", "val"):  # the 12 photos as both splits
        (classes / split).symlink_to(source, target_is_directory=True)
    tiny = [*TINY, "--set", "model.image_size=32", "--batch-size", "4", "--epochs", "2", "--set", "tensorboard=true"]
    result = beit_here("finetune", classes, "--init", "none", "--out", tmp_path / "ft", *tiny, "--set", "log_every=1")
    assert result.returncode == 0, result.stderr[-3000:]
    same_scalars(tmp_path / "ft", ("loss", "lr", "eval_top1"))

    scenes = tmp_path / "scenes"
    assert beit_here("data", "fashion-scenes", scenes, "--train", 8, "--val", 2).returncode == 0
    args = [
        *TINY,
        "--set",
        "model.depth=4",
        "--init",
        "none",
        "--crop",
        "64",
        "--batch-size",
        "4",
        "--iters",
        "4",
        "--set",
        "aux_channels=16",
    ]
    args += ["--set", "scale=[112,64]", "--set", "warmup_iters=1", "--set", "eval_every=2", "--set", "log_every=1"]
    result = beit_here("segment", "train", scenes, "--out", tmp_path / "seg", *args, "--set", "tensorboard=true")
    assert result.returncode == 0, result.stderr[-3000:]
    same_scalars(tmp_path / "seg", ("loss", "lr", "eval_mIoU"))
    board = events(tmp_path / "seg")
    (tag,) = board.Tags()["images"]
    assert [p.step for p in board.Images(tag)] == [2, 4]  # predictions beside ground truth at each evaluation

    small = ["--input-size", "32", "--vocab-size", "64", "--batch-size", "8", "--set", "model.n_hid=16"]
    small += [
        "--set",
        "model.n_init=16",
        "--set",
        "warmup_steps=2",
        "--set",
        "held_out=0.2",
        "--set",
        "tensorboard=true",
    ]
    out = tmp_path / "tok.safetensors"
    result = beit_here("tokenizer", "train", source, "-o", out, "--steps", "20", *small)
    assert result.returncode == 0, result.stderr[-3000:]
    same_scalars(out.with_suffix(".run"), ("loss", "lr"))


def test_without_the_package_the_setting_is_one_sentence(reference, tmp_path):
    """The package hidden (as where it is not installed): refused before any work."""
    code = "import sys; sys.modules['torch.utils.tensorboard'] = None\nfrom beit.cli import app; app()"
    import subprocess

    command = [sys.executable, "-c", code, "pretrain", str(reference[0]), "--out", str(tmp_path / "r"), *TINY]
    result = subprocess.run([*command, "--set", "tensorboard=true"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "tensorboard = true needs the tensorboard package: pip install 'beit[tensorboard]'" in result.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
