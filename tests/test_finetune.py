"""Fine-tuning, evaluation and export on real labelled photos, on the CPU."""

import argparse
import json
import random
import signal
import subprocess
import sys

import pytest
import torch
from helpers import COLOUR, GREY, beit_here, beit_torchrun, copy_photos, kill_when, signal_when, stop_two_ranks
from PIL import Image

from beit.shared.checkpoint import load_checkpoint, load_pretrained, save_checkpoint
from beit.shared.preempt import MARKER, PREEMPTED
from beit.train.classify.finetune import layer_decay_groups
from beit.train.model import BeitClassifier, BeitForMIM, ModelConfig

MODEL = dict(preset="tiny", image_size=64, width=96, heads=3, depth=2, vocab_size=128)
ARGS = [
    "--model",
    "tiny",
    "--set",
    "model.image_size=64",
    "--set",
    "model.width=96",
    "--set",
    "model.heads=3",
    "--set",
    "model.depth=2",
    "--batch-size",
    "4",
    "--lr",
    "1e-3",
    "--set",
    "warmup_epochs=1",
    "--set",
    "log_every=1",
]


def _losses(run) -> list[dict]:
    """The training rows of a run folder's metrics (not its evaluations)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_top1" not in r]


def write_data(root, init_seed: int = 0):
    """colour vs grey photos: train/ 12 images, val/ 4, as 96 px JPEGs; and a randomly
    initialised MIM model (from `init_seed`) to stand for a pre-trained one."""
    for cls, names in (("colour", COLOUR[:8]), ("grey", GREY[:7] + ["chessboard_GRAY.png"])):
        for i, path in enumerate(copy_photos(root / "raw", names)):
            split = "val" if i % 4 == 0 else "train"
            (root / "data" / split / cls).mkdir(parents=True, exist_ok=True)
            image = Image.open(path).convert("RGB")
            scale = 96 / min(image.size)
            image.resize((round(image.width * scale), round(image.height * scale))).save(
                root / "data" / split / cls / f"{path.stem}.jpg", quality=90
            )
    torch.manual_seed(init_seed)
    pretrained = root / "pt.pt"
    save_checkpoint(pretrained, {"model": BeitForMIM(ModelConfig(**MODEL)).state_dict()}, {"kind": "pretrain"})
    return root / "data", pretrained


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("ft"))


def test_layer_wise_learning_rates_follow_the_released_formula():
    model = BeitClassifier(ModelConfig(**{**MODEL, "depth": 4, "num_classes": 5}))
    groups = layer_decay_groups(model, lr=1.0, weight_decay=0.05, decay=0.65)

    def released_layer_id(name: str) -> int:  # unilm's get_num_layer_for_vit, with num_max_layer = depth + 2
        if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        if name.startswith("rel_pos_bias"):
            return 5
        if name.startswith("blocks"):
            return int(name.split(".")[1]) + 1
        return 5

    checked = 0
    for group in groups:
        for name, p in zip(group["names"], group["params"], strict=True):
            assert group["lr"] == pytest.approx(0.65 ** (4 + 1 - released_layer_id(name))), name
            no_decay = p.ndim == 1 or name.endswith(".bias") or name == "cls_token"
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
            checked += 1
    assert checked == len(list(model.parameters()))


def test_finetune_from_pretraining_and_from_scratch(data, tmp_path):
    folder, pretrained = data
    for init in (pretrained, "none"):
        run = tmp_path / ("pt" if init != "none" else "scratch")
        result = beit_here("finetune", folder, "--init", init, "--out", run, *ARGS, "--epochs", "3")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "val top-1" in result.stdout
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if "eval_top1" in r]
        assert len(evals) == 3 and 0.0 <= evals[-1]["eval_top1"] <= 1.0
        assert (run / "best.pt").exists() and (run / "checkpoint.pt").exists()
    result = beit_here("evaluate", tmp_path / "pt" / "best.pt", folder / "val", "--per-class")
    assert result.returncode == 0 and "over all 4 listed images" in result.stdout and "colour" in result.stdout


def test_stopped_by_sigterm_then_killed_then_resumed_runs_every_step_once(data, tmp_path):
    """SIGTERM at a random step (no periodic checkpoint due): exit 75, the checkpoint at the step in
    flight; resumed, then SIGKILLed one step into an epoch past a periodic checkpoint; resumed to
    the end. A resumed fine-tuning draws fresh augmentations (DALI's random operators cannot be
    rewound), so the standard is every step once, none missing, and the same evaluations."""
    folder, pretrained = data
    run = tmp_path / "run"
    command = [sys.executable, "-m", "beit", "finetune", str(folder), "--init", str(pretrained), "--out", str(run)]
    command += [*ARGS, "--epochs", "6"]
    drawn = random.randint(1, 4)
    code, stderr = signal_when([*command, "--set", "checkpoint_every=1000"], lambda: len(_losses(run)) >= drawn)
    assert code == PREEMPTED and "preempted: stopped by SIGTERM at step " in stderr, (drawn, code, stderr[-3000:])
    stopped = json.loads((run / "checkpoint.json").read_text())["step"]
    assert drawn <= stopped < 18 and _losses(run)[-1]["step"] == stopped, (drawn, stopped)
    assert json.loads((run / MARKER).read_text())["step"] == stopped
    command += ["--set", "checkpoint_every=2"]

    def past_a_checkpoint_within_an_epoch() -> bool:
        # 3 steps an epoch, checkpoints at steps 2, 3 (evaluation), 4, 6, ...: killed after step 5
        # is logged, before 6 is saved, the run resumes from step 4, one step into epoch 2
        saved = json.loads((run / "checkpoint.json").read_text())["step"]
        return saved > stopped and saved % 3 == 1 and any(r["step"] > saved for r in _losses(run))

    assert kill_when(command, past_a_checkpoint_within_an_epoch) == -signal.SIGKILL  # killed mid-run, not finished
    resumed_from = json.loads((run / "checkpoint.json").read_text())["step"]
    assert stopped < resumed_from < 18
    result = beit_here(*command[3:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (run / MARKER).exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_top1" in r]
    assert [r["step"] for r in rows if "eval_top1" not in r] == list(range(1, 19))  # no step twice, none missing
    assert [r["step"] for r in evals] == [3, 6, 9, 12, 15, 18]
    again = beit_here(*command[3:])  # a finished run: reports it
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"fine-tuned 18 steps; val top-1 {evals[-1]['eval_top1'] * 100:.2f}%" in again.stdout


def test_an_official_layout_checkpoint_fine_tunes_with_no_missing_keys(data, tmp_path):
    folder, _ = data
    mim = BeitForMIM(ModelConfig(**MODEL))
    state = dict(mim.state_dict())
    for name, buffer in mim.named_buffers():
        if name.endswith("relative_position_index"):
            state[name] = buffer
    torch.save({"model": state, "args": argparse.Namespace(model="beit_tiny")}, tmp_path / "official.pth")
    result = beit_here(
        "finetune", folder, "--init", tmp_path / "official.pth", "--out", tmp_path / "run", *ARGS, "--epochs", "1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "copied the shared relative position table" in result.stdout


def test_export_loads_into_the_timm_layout_with_the_same_logits(data, tmp_path):
    folder, pretrained = data
    run = tmp_path / "run"
    assert beit_here("finetune", folder, "--init", pretrained, "--out", run, *ARGS, "--epochs", "1").returncode == 0
    state, meta = load_checkpoint(run / "best.pt")
    original = BeitClassifier(ModelConfig(**meta["model"])).eval()
    original.load_state_dict(state["model"])
    pixels = torch.randn(2, 3, 64, 64)
    for fmt, name in (("timm", "model.pth"), ("safetensors", "model.safetensors")):
        result = beit_here("export", run / "best.pt", "-o", tmp_path / name, "--format", fmt)
        assert result.returncode == 0, result.stderr
        exported = BeitClassifier(ModelConfig(**meta["model"])).eval()
        assert load_pretrained(exported, tmp_path / name) == []  # no missing, unexpected or adapted keys
        with torch.no_grad():
            assert torch.equal(exported(pixels), original(pixels))


def test_bad_inputs_are_one_clear_error_each(data, tmp_path):
    folder, pretrained = data
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(folder), str(bad)], check=True)
    (bad / "val" / "zebra").mkdir()
    Image.new("RGB", (32, 32)).save(bad / "val" / "zebra" / "z.jpg")
    result = beit_here("finetune", bad, "--init", "none", "--out", tmp_path / "r", *ARGS)
    assert result.returncode == 1 and "val has classes that train/ lacks (zebra)" in result.stderr
    (bad / "val" / "zebra" / "z.jpg").unlink()
    result = beit_here("finetune", bad, "--init", "none", "--out", tmp_path / "r", *ARGS)
    assert result.returncode == 1 and "is empty" in result.stderr
    other = tmp_path / "other.pt"
    save_checkpoint(
        other, {"model": BeitForMIM(ModelConfig(**{**MODEL, "width": 48})).state_dict()}, {"kind": "pretrain"}
    )
    result = beit_here("finetune", folder, "--init", other, "--out", tmp_path / "r", *ARGS)
    assert result.returncode == 1 and "does not fit the model" in result.stderr
    result = beit_here("finetune", tmp_path / "nowhere", "--init", "none", "--out", tmp_path / "r", *ARGS)
    assert result.returncode == 1 and "does not exist" in result.stderr
    result = beit_here("finetune", folder, "--init", tmp_path / "missing.pt", "--out", tmp_path / "r", *ARGS)
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_linear_probe_reports_every_layer(data):
    folder, pretrained = data
    model_args = [
        "--model",
        "tiny",
        "--set",
        "model.image_size=64",
        "--set",
        "model.width=96",
        "--set",
        "model.heads=3",
        "--set",
        "model.depth=2",
    ]
    result = beit_here("probe", folder, "--init", pretrained, *model_args, "--all-layers", "--epochs", "100")
    assert result.returncode == 0, result.stderr[-3000:]
    accuracies = [float(line.split("top-1")[1].strip(" %")) for line in result.stdout.splitlines() if "block" in line]
    assert len(accuracies) == 2 and all(0 <= a <= 100 for a in accuracies)
    # colour against grey photos is linearly separable from almost any features. 8 init seeds of the
    # stand-in model on AMD EPYC (2026-11-30, tests/calibration/seeds.py probe): the best block 100% every time
    # (one block alone fell to 75% once); threshold = min - one of the 4 val images.
    assert max(accuracies) >= 75
    result = beit_here("probe", folder, "--init", pretrained, *model_args, "--layer", "5")
    assert result.returncode == 1 and "outside the model's blocks 1..2" in result.stderr


def test_fine_tune_from_a_token_store_and_with_two_processes(data, tmp_path):
    folder, pretrained = data
    torch.manual_seed(0)
    from beit.shared.dvae import DVAE, DVAEConfig, save_tokenizer

    tokenizer = tmp_path / "tok.safetensors"
    save_tokenizer(DVAE(DVAEConfig(n_hid=16, blocks_per_group=1, vocab_size=128, n_init=8)), tokenizer, input_size=32)
    store = tmp_path / "store"
    result = beit_here(
        "tokenize",
        folder / "train",
        store,
        "--tokenizer",
        tokenizer,
        "--views",
        "1",
        "--set",
        "view.image_size=64",
        "--embed-images",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = beit_here(
        "finetune",
        store,
        "--init",
        pretrained,
        "--out",
        tmp_path / "from-store",
        *ARGS,
        "--epochs",
        "1",
        "--set",
        "held_out=0.25",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state, meta = load_checkpoint(tmp_path / "from-store" / "best.pt")
    assert meta["class_names"] == ["colour", "grey"]
    # two ranks, SIGUSR1 (the default stop_signal) to one of them at a random step, no periodic
    # checkpoint due: both stop at that step (the checkpoint's), exit 75; the resume runs every step once
    run = tmp_path / "ddp"
    args = ["finetune", folder, "--init", pretrained, "--out", run, *ARGS, "--epochs", 4]
    args += ["--set", "randaugment=false", "--set", "eval_every=4"]  # 1 step an epoch; one evaluation
    drawn = random.randint(1, 2)
    stopped = stop_two_ranks(args, run, lambda: len(_losses(run)), drawn)
    assert drawn <= stopped < 4 and _losses(run)[-1]["step"] == stopped, (drawn, stopped)
    result = beit_torchrun(2, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    state, meta = load_checkpoint(run / "checkpoint.pt")
    assert meta["world_size"] == 2 and [r["step"] for r in _losses(run)] == list(range(1, meta["step"] + 1))
