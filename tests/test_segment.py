"""`beit segment` end to end on the built-in fashion-scenes task, on the CPU: training, resume
after SIGTERM (exit 75) and SIGKILL, two torchrun ranks, evaluation and prediction, the pt2ft recipe from a fine-tuned
checkpoint, and bad input."""

import json
import random
import signal
import sys

import numpy as np
import pytest
import torch
from helpers import beit_here, beit_torchrun, kill_when, signal_when, stop_two_ranks, the_error
from PIL import Image

from beit.shared.checkpoint import load_checkpoint, save_checkpoint
from beit.shared.preempt import PREEMPTED
from beit.train.model import BeitForMIM, ModelConfig
from beit.train.scaffold import layer_decay_groups
from beit.train.segment.trainer import poly_lr_at

MODEL = dict(preset="tiny", image_size=64, width=48, heads=2, depth=4, vocab_size=64, drop_path=0.0)
ARGS = [
    "--crop", "64", "--batch-size", "4",
    "--set", "model.width=48", "--set", "model.heads=2", "--set", "model.depth=4", "--set", "model.preset=tiny",
    "--set", "aux_channels=16", "--set", "scale=[112,64]", "--set", "warmup_iters=1", "--set", "log_every=1",
]  # fmt: skip


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 training and 8 validation scenes, and a pre-trained (randomly initialised) ViT."""
    root = tmp_path_factory.mktemp("seg")
    result = beit_here("data", "fashion-scenes", root / "scenes", "--train", 24, "--val", 8)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.manual_seed(0)
    pretrained = root / "pt.pt"
    save_checkpoint(pretrained, {"model": BeitForMIM(ModelConfig(**MODEL)).state_dict()}, {"kind": "pretrain"})
    return root / "scenes", pretrained


def test_trains_evaluates_predicts_and_resumes_after_sigterm_and_sigkill(data, tmp_path):
    scenes, pretrained = data
    args = [*ARGS, "--iters", "12", "--set", "eval_every=6", "--set", "checkpoint_every=3"]
    whole = tmp_path / "whole"
    result = beit_here("segment", "train", scenes, "--init", pretrained, "--out", whole, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val mIoU" in result.stdout and "fpn1" in result.stdout  # new heads noted
    rows = metrics(whole)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_mIoU" in r]
    assert len(losses) == 12 and [r["step"] for r in evals] == [6, 12]
    assert all(0 <= r["eval_mIoU"] <= 1 and 0 <= r["eval_aAcc"] <= 1 for r in evals)
    state, meta = load_checkpoint(whole / "best.pt")
    assert meta["kind"] == "segment" and meta["class_names"][0] == "background" and len(meta["class_names"]) == 11
    assert meta["best_miou"] == max(r["eval_mIoU"] for r in evals)

    # stopped by SIGTERM at a random step (no periodic checkpoint due): exit 75 and the checkpoint
    # at the step in flight; resumed, then SIGKILLed past the next periodic checkpoint; resumed
    cut = tmp_path / "cut"
    command = [sys.executable, "-m", "beit", "segment", "train", scenes, "--init", pretrained, "--out", cut, *args]
    drawn = random.randint(1, 4)
    code, stderr = signal_when([*command, "--set", "checkpoint_every=1000"], lambda: len(metrics(cut)) >= drawn)
    assert code == PREEMPTED and "preempted: stopped by SIGTERM at step " in stderr, (drawn, code, stderr[-3000:])
    stopped = json.loads((cut / "checkpoint.json").read_text())["step"]
    assert drawn <= stopped < 12 and max(r["step"] for r in metrics(cut)) == stopped, (drawn, stopped)

    def past_a_checkpoint() -> bool:
        return json.loads((cut / "checkpoint.json").read_text())["step"] > stopped

    assert kill_when(command, past_a_checkpoint) == -signal.SIGKILL
    result = beit_here("segment", "train", scenes, "--init", pretrained, "--out", cut, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = [r["loss"] for r in metrics(cut) if "loss" in r]
    assert resumed == pytest.approx(losses, rel=1e-5)  # the same crops, drop path and dropout draws

    picture = tmp_path / "compare.png"
    options = ["--per-class", "--flip", "--scales", "0.75,1.0", "--picture", picture]
    result = beit_here("segment", "evaluate", whole / "best.pt", scenes, *options)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(picture).height == 6 * (160 + 4)  # six images beside their ground truth and prediction
    assert result.stdout.startswith("mIoU ") and "background" in result.stdout and "ankle-boot" in result.stdout
    figures = tmp_path / "figures.json"
    result = beit_here("segment", "evaluate", whole / "best.pt", scenes, "--json", figures)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(figures.read_text())
    assert result.stdout.startswith(f"mIoU {written['mIoU'] * 100:.2f}, mAcc {written['mAcc'] * 100:.2f}")
    assert [row["name"] for row in written["per_class"]][:2] == ["background", "t-shirt"]
    images = sorted((scenes / "images" / "validation").glob("*.png"))[:2]
    result = beit_here("segment", "predict", whole / "best.pt", *images, "-o", tmp_path / "masks", "--overlay")
    assert result.returncode == 0, result.stderr[-3000:]
    for image in images:
        mask = Image.open(tmp_path / "masks" / image.name)
        assert mask.mode == "P" and mask.size == Image.open(image).size
        assert np.asarray(mask).max() < 11 and (tmp_path / "masks" / f"{image.stem}_overlay.jpg").exists()


def test_two_torchrun_ranks_train_stop_together_on_a_signal_to_one_and_resume(data, tmp_path):
    """Two ranks, SIGUSR1 (the default stop_signal) to one of them at a random step, no periodic
    checkpoint due: both stop at the same step, which the checkpoint holds, and exit 75; the same
    command resumes there and runs every remaining step once."""
    scenes, pretrained = data
    run = tmp_path / "ddp"
    args = ["segment", "train", scenes, "--init", pretrained, "--out", run, *ARGS, "--iters", "8"]
    drawn = random.randint(1, 4)
    stopped = stop_two_ranks(args, run, lambda: len(metrics(run)), drawn)
    assert drawn <= stopped < 8 and max(r["step"] for r in metrics(run)) == stopped, (drawn, stopped)
    assert json.loads((run / "preempted.json").read_text())["step"] == stopped
    result = beit_torchrun(2, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(run / "checkpoint.pt")[1]["world_size"] == 2
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) for r in metrics(run) if "loss" in r)


def test_intermediate_fine_tuning_end_to_end_takes_the_released_pt2ft_values(data, tmp_path):
    """The paper's intermediate fine-tuning: the pre-trained ViT is fine-tuned as a classifier on
    labelled images (`beit finetune`), and that checkpoint initialises the segmenter, where lr 3e-5
    and layer decay 0.9 apply unless set (the crop, 640 by default, is set here)."""
    scenes, pretrained = data
    images = tmp_path / "fmnist"
    assert beit_here("data", "fashion-mnist", images, "--size", 32, "--train", 40, "--val", 20).returncode == 0
    model = [*ARGS[4:10], "--set", "model.image_size=32"]  # the segmenter's ViT at 32 px
    result = beit_here(
        "finetune", images, "--init", pretrained, "--out", tmp_path / "ft", "--model", "tiny", *model,
        "--epochs", 1, "--batch-size", 8, "--set", "randaugment=false", "--set", "warmup_epochs=0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    classifier = tmp_path / "ft" / "best.pt"
    run = tmp_path / "pt2ft"
    result = beit_here("segment", "train", scenes, "--init", classifier, "--out", run, *ARGS, "--iters", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finetuned recipe, lr 3e-05" in result.stdout
    assert "dropped fc_norm.weight, fc_norm.bias, head.weight, head.bias" in result.stdout  # the classifier's head
    assert "resized relative position tables from a 2x2 to a 4x4 grid" in result.stdout
    meta = load_checkpoint(run / "checkpoint.pt")[1]
    assert meta["layer_decay"] == 0.9 and meta["effective_lr"] == 3e-5
    explicit = tmp_path / "explicit"
    result = beit_here(
        "segment", "train", scenes, "--init", classifier, "--out", explicit, *ARGS, "--iters", 1, "--lr", 1
    )
    assert result.returncode == 0 and load_checkpoint(explicit / "checkpoint.pt")[1]["effective_lr"] == 1.0


def test_layer_wise_rates_and_the_poly_schedule_follow_the_released_formulas():
    from beit.train.segment.model import BeitSegmenter

    model = BeitSegmenter(ModelConfig(**{**MODEL, "num_classes": 3}), aux_channels=8)
    groups = layer_decay_groups(model, lr=1.0, weight_decay=0.05, decay=0.9)
    for group in groups:
        for name in group["names"]:
            assert group["lr_scale"] == pytest.approx(0.9 ** (4 + 1 - model.layer_id(name))), name
            flat = group["params"][group["names"].index(name)].ndim == 1  # biases, norms, layer scales
            assert group["weight_decay"] == (0.0 if flat or name == "cls_token" else 0.05), name
    heads = [g for g in groups if any(n.startswith(("decode_head", "auxiliary_head", "fpn")) for n in g["names"])]
    assert heads and all(g["lr_scale"] == 1.0 for g in heads)  # the heads at the top: the full lr
    assert poly_lr_at(0, 1.0, 100, 10, 1e-6, 1.0, 0.0) == pytest.approx(1e-6)  # mmcv's warm-up starts at ratio x lr
    assert poly_lr_at(5, 1.0, 100, 10, 1e-6, 1.0, 0.0) == pytest.approx(0.95 * (0.5 + 0.5 * 1e-6))
    assert poly_lr_at(10, 1.0, 100, 10, 1e-6, 1.0, 0.0) == pytest.approx(0.9)
    assert poly_lr_at(100, 1.0, 100, 10, 1e-6, 1.0, 0.0) == 0.0


def test_bad_input_is_one_clear_error(data, tmp_path):
    scenes, pretrained = data
    mask = next((scenes / "annotations" / "training").glob("*.png"))
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(scenes, bad)
    Image.open(mask).resize((10, 10)).save(bad / "annotations" / "training" / mask.name)
    result = beit_here("segment", "train", bad, "--init", "none", "--out", tmp_path / "r1", *ARGS, "--iters", "1")
    assert result.returncode == 1 and mask.name in result.stderr and "a mask must label every pixel" in result.stderr
    # a checkpoint of another model size
    other = tmp_path / "other.pt"
    save_checkpoint(
        other, {"model": BeitForMIM(ModelConfig(**{**MODEL, "width": 64})).state_dict()}, {"kind": "pretrain"}
    )
    result = beit_here("segment", "train", scenes, "--init", other, "--out", tmp_path / "r2", *ARGS, "--iters", "1")
    assert result.returncode == 1 and the_error(result.stderr)


def test_a_checkpoint_brings_its_architecture(data, tmp_path):
    """No model settings given: the segmenter is the checkpoint's model (here 4 blocks of width 48
    with 2 heads, read from its tensors), not the default preset; a setting given that differs is
    named before the weights refuse to fit."""
    scenes, pretrained = data
    args = ["--crop", "64", "--batch-size", "4", "--iters", "2", "--set", "aux_channels=16"]
    args += ["--set", "scale=[112,64]", "--set", "warmup_iters=1", "--set", "eval_every=100"]
    result = beit_here("segment", "train", scenes, "--init", pretrained, "--out", tmp_path / "a", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    config = (tmp_path / "a" / "config.toml").read_text()
    assert all(line in config for line in ("width = 48", "depth = 4", "heads = 2", "patch_size = 16"))
    result = beit_here("segment", "train", scenes, "--init", pretrained, "--out", tmp_path / "b", *args,
                       "--set", "model.depth=3")  # fmt: skip
    assert "model.depth 3 as asked, not the checkpoint's 4" in result.stdout
    assert result.returncode == 1 and "does not fit the model" in result.stderr


def test_settings_left_unset_follow_the_crop_and_the_runs_length(data, tmp_path):
    """The resize scale follows the crop (4 x crop by crop: the released 2048 x 512 at 512), the
    warm-up the run's length (1,500 of 160,000 iterations) and the crop, when not given, images
    smaller than the recipe's, each recorded in config.toml with where it came from; a warm-up
    longer than the run, or a scale that never reaches the crop, is one sentence before any work."""
    scenes, pretrained = data
    args = ["--crop", "64", "--batch-size", "4", "--set", "aux_channels=16", "--set", "eval_every=100"]
    result = beit_here("segment", "train", scenes, "--init", pretrained, "--out", tmp_path / "a", *args, "--iters", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    config = (tmp_path / "a" / "config.toml").read_text()
    assert "scale = [256, 64]  # 4 x the crop by the crop 64 (the released 2048 x 512 at 512)" in config
    assert "warmup_iters = 1  # the released share of the run's 2 iterations (1,500 of 160,000)" in config
    assert load_checkpoint(tmp_path / "a" / "checkpoint.pt")[1]["scale"] == [256, 64]
    # no crop given: the scenes (none 512 px on its shorter side) get a crop they hold, not the recipe's 512
    result = beit_here(
        "segment", "train", scenes, "--init", pretrained, "--out", tmp_path / "b", *args[2:], "--iters", 1
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = (tmp_path / "b" / "config.toml").read_text()
    crop = load_checkpoint(tmp_path / "b" / "checkpoint.pt")[1]["model"]["image_size"]
    assert crop % 32 == 0 and 32 <= crop < 512
    assert f"image_size = {crop}  # the images: none is 512 px on its shorter side" in config
    for setting, sentence in (
        ("warmup_iters=3", "warmup_iters 3 is longer than the run (iters 2): the learning rate would never leave"),
        ("scale=[64,16]", "scale [64, 16] resizes images to at most 32 px on the shorter side (ratio_range up to 2.0)"),
    ):
        out = tmp_path / setting.split("=")[0]
        result = beit_here("segment", "train", scenes, "--init", pretrained, "--out", out, *args, "--iters", 2,
                           "--set", setting)  # fmt: skip
        assert result.returncode == 1 and sentence in result.stderr, result.stderr
        assert not (out / "metrics.jsonl").exists()
