"""The spread over seeds of what a quality test checks, so that its threshold comes from a measured
distribution with its margin written beside it (issue 11). One experiment per subcommand, each the
test's own data and command with the seed varied, one run after another:

    python tests/calibration/seeds.py probe [--seeds 0-7]       # tests/test_finetune.py's linear probe
    python tests/calibration/seeds.py pretrain [--seeds 0-7] [--ablation="--targets online"] [--json F]
    python tests/calibration/seeds.py pictures [--seeds 0-7]    # tests/test_pictures.py's attention picture
    python tests/calibration/seeds.py tokenizer [--seeds 0-7] [--threads 2] [--deterministic] [--set k=v ...]
    python tests/calibration/seeds.py demo-tokenizer [--seeds 0-7] [--work DIR] [--set k=v ...]

Each prints a row per seed, then min / median / max of what the test checks. Seeds are '0-7' or
'0,3,5'.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

TINY_PROBE = ["--model", "tiny", "--set", "model.image_size=64", "--set", "model.width=96"]
TINY_PROBE += ["--set", "model.heads=3", "--set", "model.depth=2"]


def seeds_of(text: str) -> list[int]:
    """'0-7' or '0,3,5'."""
    first, _, last = text.partition("-")
    return list(range(int(first), int(last) + 1)) if last else [int(s) for s in text.split(",")]


def spread(name: str, values: list[float], digits: int = 3, unit: str = "") -> None:
    import numpy as np

    low, middle, high = min(values), float(np.median(values)), max(values)
    low, middle, high = (f"{value:.{digits}f}" for value in (low, middle, high))
    print(f"{name} over {len(values)} seeds: min {low}, median {middle}, max {high}{unit}")


def probe(args) -> None:
    """`test_linear_probe_reports_every_layer`'s data and command, the stand-in "pre-trained" model
    initialised from seed S instead of 0: the probe's top-1 per block and their maximum."""
    import test_finetune
    from helpers import beit

    best = []
    with tempfile.TemporaryDirectory() as tmp:
        print("seed  top-1 per block  max")
        for seed in seeds_of(args.seeds):
            folder, pretrained = test_finetune.write_data(Path(tmp) / f"s{seed}", init_seed=seed)
            result = beit("probe", folder, "--init", pretrained, *TINY_PROBE, "--all-layers", "--epochs", "100")
            assert result.returncode == 0, result.stderr[-3000:]
            lines = [line for line in result.stdout.splitlines() if "block" in line]
            accuracies = [float(line.split("top-1")[1].strip(" %")) for line in lines]
            best.append(max(accuracies))
            print(f"{seed:4d}  {accuracies}  {best[-1]:.1f}", flush=True)
    spread("max top-1", best, 1)


def pretrain(args) -> None:
    """`test_a_few_hundred_steps_lower_the_loss_and_beat_the_majority_token`'s store and command with
    `--seed S`: the last MIM accuracy minus the majority-token rate, the last loss over ln(128) and
    over the first loss. With --ablation, `test_every_ablation_runs_and_its_loss_falls`'s run
    instead (25 epochs, log every 10 steps, the flag added), whose test checks last / first loss."""
    import numpy as np
    import test_pretrain
    from helpers import beit

    from beit.train.pretrain.data import PretrainData, Sampling

    with tempfile.TemporaryDirectory() as tmp:
        location, _ = test_pretrain.write_store(Path(tmp))
        tokens = PretrainData(str(location), Sampling(8, seed=0)).tokens
        majority = np.bincount(tokens.ravel()).max() / tokens.size
        print(f"majority-token rate {majority:.4f}")
        print("seed  accuracy  accuracy-majority  last-loss/ln128  last/first-loss")
        table = []
        for seed in seeds_of(args.seeds):
            run = Path(tmp) / f"run{seed}"
            command = ["pretrain", location, "--out", run, *test_pretrain.TINY]
            if args.ablation:
                command += [*args.ablation.split(), "--epochs", "25", "--set", "log_every=10"]
            else:
                command += ["--epochs", "150", "--set", "log_every=50"]
            result = beit(*command, "--seed", seed)
            assert result.returncode == 0, result.stderr[-3000:]
            rows = test_pretrain.metrics(run)
            accuracy = rows[-1].get("mim_accuracy", float("nan"))  # none with --targets pixels
            row = (accuracy, accuracy - majority, rows[-1]["loss"] / np.log(128), rows[-1]["loss"] / rows[0]["loss"])
            table.append(row)
            print(f"{seed:4d}  {row[0]:.4f}  {row[1]:17.4f}  {row[2]:15.3f}  {row[3]:15.3f}", flush=True)
            if args.json:
                with args.json.open("a") as f:
                    record = {"seed": seed, "ablation": args.ablation, "majority": majority}
                    f.write(json.dumps({**record, "rows": [rows[0], rows[-1]]}) + "\n")
    names = ("accuracy-majority", "last-loss/ln128", "last/first-loss")
    for name, column in zip(names, list(zip(*table, strict=True))[1:], strict=True):
        spread(name, list(column), 4)


def pictures(args) -> None:
    """`test_attention_command_writes_the_picture`'s model, `randomized(..., seed=S)` after
    `torch.manual_seed(S)`: the lowest peak (x uniform) and highest entropy (fraction of log N) over
    the picture's queries, and the picture's grey-level standard deviation (the test checks that of
    another picture, `beit attention`'s of a randomised MIM model)."""
    import numpy as np
    import test_pictures
    import torch
    from helpers import copy_photos
    from PIL import Image

    from beit.train.model import BeitClassifier, ModelConfig
    from beit.train.pretrain.pictures import attention_picture

    cfg = ModelConfig(**test_pictures.TINY).resolved()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        photos = copy_photos(Path(tmp) / "photos", ["astronaut.png", "coffee.png"])
        print("seed  min-peak  max-entropy  picture-std")
        for seed in seeds_of(args.seeds):
            torch.manual_seed(seed)
            model = test_pictures.randomized(BeitClassifier(cfg), seed=seed)
            out = Path(tmp) / f"ft{seed}.png"
            summaries = attention_picture(model, photos[:1], out)
            std = float(np.asarray(Image.open(out).convert("L")).std())
            rows.append((min(s["peak"] for s in summaries[0]), max(s["entropy"] for s in summaries[0]), std))
            print(f"{seed:4d}  {rows[-1][0]:8.3f}  {rows[-1][1]:11.3f}  {rows[-1][2]:11.1f}", flush=True)
    for name, column in zip(("min peak", "max entropy", "picture std"), zip(*rows, strict=True), strict=True):
        spread(name, list(column))


def tokenizer_test_settings() -> tuple[list[str], int]:
    """tests/test_dvae_train.py's SMALL overrides as `key=value` strings, and its steps (read from
    the test file, so the two cannot drift apart)."""
    import test_dvae_train

    small, overrides = list(test_dvae_train.SMALL), []
    flags = {"--input-size": "input_size", "--vocab-size": "model.vocab_size", "--batch-size": "batch_size"}
    while small:
        flag, value = small.pop(0), small.pop(0)
        overrides.append(value if flag == "--set" else f"{flags[flag]}={value}")
    return overrides, test_dvae_train.STEPS


def all_photos_psnr(model, stream, batches: int = 16) -> dict:
    """PSNR of hard-token reconstructions of the same random crops of all the photos for every seed
    (the model's quality without the split's luck), against the mean colour of the whole batch and
    of each crop."""
    import torch
    import torch.nn.functional as F

    errors, batch_mean, crop_mean = [], [], []
    with torch.no_grad():
        for _ in range(batches):
            pixels = stream.next()
            errors.append(F.mse_loss(model.reconstruct(model.tokenize(pixels)), pixels).item())
            batch_mean.append(F.mse_loss(pixels.mean(dim=(0, 2, 3), keepdim=True).expand_as(pixels), pixels).item())
            crop_mean.append(F.mse_loss(pixels.mean(dim=(2, 3), keepdim=True).expand_as(pixels), pixels).item())
    return {
        name: 10 * math.log10(1 / (sum(values) / len(values)))
        for name, values in (("psnr", errors), ("batch_mean_psnr", batch_mean), ("crop_mean_psnr", crop_mean))
    }


def tokenizer(args) -> None:
    """tests/test_dvae_train.py's workload (its photos, its SMALL settings, its steps) in-process, no
    resume: held-out PSNR, the mean-colour baseline on the same crops, their gap, the codes used;
    `--set` overrides DVAETrainConfig keys on top of the test's."""
    import test_dvae_train
    import torch
    from helpers import COLOUR, GREY, copy_photos, save_jpeg

    from beit.shared.config import load_config
    from beit.shared.dvae import load_tokenizer
    from beit.shared.images import list_images
    from beit.train.tokenizer.trainer import CropStream, DVAETrainConfig, train_dvae

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(args.deterministic)
    overrides, steps = tokenizer_test_settings()
    overrides.append(f"steps={args.steps or steps}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        if args.whole_photos:
            folder.mkdir()
            for path in copy_photos(Path(tmp) / "source", COLOUR + GREY):
                save_jpeg(path, folder / f"{path.stem}.jpg", 160)
        else:
            test_dvae_train.write_photos(Path(tmp) / "source", folder)
        gaps, fixed_gaps = [], []
        print(
            f"settings: {' '.join(overrides + args.overrides)}; threads {args.threads}, deterministic "
            f"{args.deterministic}, {'whole photos' if args.whole_photos else 'tiles'}"
        )
        print("seed  psnr  baseline  gap  codes  held-out  all-photos: psnr  gap-to-batch-mean  gap-to-crop-mean  s")
        for seed in seeds_of(args.seeds):
            cfg = load_config(DVAETrainConfig, None, [*overrides, *args.overrides, f"seed={seed}"])
            start = time.perf_counter()
            out = Path(tmp) / f"tok{seed}.safetensors"
            report = train_dvae(folder, out, cfg, resume=False, progress=False)
            held = report["held_out"]
            crops = CropStream(list_images(folder), cfg, 2024, torch.device("cpu"))
            fixed = all_photos_psnr(load_tokenizer(out), crops)
            fixed_gaps.append(fixed["psnr"] - fixed["crop_mean_psnr"])
            gaps.append(held["psnr"] - held["baseline_psnr"])
            print(
                f"{seed:4d}  {held['psnr']:.2f}  {held['baseline_psnr']:.2f}  {gaps[-1]:.2f}  {held['codes_used']:5d}"
                f"  {report['held_out_images']:8d}  {fixed['psnr']:16.2f}"
                f"  {fixed['psnr'] - fixed['batch_mean_psnr']:17.2f}  {fixed_gaps[-1]:16.2f}"
                f"  {time.perf_counter() - start:.0f}",
                flush=True,
            )
            if args.json:
                record = {"seed": seed, "threads": args.threads, "deterministic": args.deterministic, **held}
                record |= {"whole_photos": args.whole_photos, "all_photos": fixed, "overrides": args.overrides}
                with args.json.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    spread("held-out gap", gaps, 2, " dB")
    spread("all-photos gap to each crop's mean colour", fixed_gaps, 2, " dB")


def demo_tokenizer(args) -> None:
    """scripts/demo.sh's `beit tokenizer train` line on its Fashion-MNIST training images, with the
    seed: held-out PSNR, the mean-colour baseline (each crop's), their gap, the codes used."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    python = [sys.executable, "-m", "beit"]
    if not (work / "data" / "train").is_dir():
        subprocess.run([*python, "data", "fashion-mnist", work / "data", "--size", "28"], check=True, cwd=ROOT)
    demo = ["--steps", "400", "--input-size", "28", "--vocab-size", "512", "--batch-size", "64"]
    for setting in (
        "model.group_count=3",
        "model.n_hid=32",
        "model.n_init=32",
        "warmup_steps=100",
        "held_out=0.05",
        "min_crop_area=0.5",
    ):
        demo += ["--set", setting]
    gaps = []
    print("seed  psnr  baseline  gap  codes")
    for seed in seeds_of(args.seeds):
        out = work / f"tok{seed}.safetensors"
        extra = [x for setting in args.overrides for x in ("--set", setting)]
        command = [*python, "tokenizer", "train", work / "data" / "train", "-o", out, "--no-resume", *demo]
        subprocess.run([*command, "--set", f"seed={seed}", *extra], check=True, cwd=ROOT, capture_output=True)
        held = json.loads(out.with_suffix(".json").read_text())["report"]["held_out"]
        gaps.append(held["psnr"] - held["baseline_psnr"])
        print(f"{seed:>4}  {held['psnr']:.2f}  {held['baseline_psnr']:.2f}  {gaps[-1]:.2f}  {held['codes_used']}")
    spread("gap", gaps, 2, " dB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, function in (("probe", probe), ("pretrain", pretrain), ("pictures", pictures)):
        sub = commands.add_parser(name, help=function.__doc__.split("\n")[0])
        sub.set_defaults(run=function)
    commands.choices["pretrain"].add_argument("--json", type=Path, help="append one JSON line per seed here")
    commands.choices["pretrain"].add_argument(
        "--ablation", help="the ablation test's run with this flag: --ablation='--mask random'"
    )
    sub = commands.add_parser("tokenizer", help="tests/test_dvae_train.py's tokenizer training")
    sub.set_defaults(run=tokenizer)
    sub.add_argument("--threads", type=int, default=2, help="torch threads")
    sub.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    sub.add_argument("--steps", type=int, help="instead of the test's")
    sub.add_argument("--json", type=Path, help="append one JSON line per seed here")
    sub.add_argument("--whole-photos", action="store_true", help="the data before issue 11: 16 whole 160 px photos")
    sub = commands.add_parser("demo-tokenizer", help="the demo's tokenizer training")
    sub.set_defaults(run=demo_tokenizer)
    sub.add_argument("--work", default=str(ROOT / "runs" / "demo-tokenizer-seeds"))
    for sub in commands.choices.values():
        sub.add_argument("--seeds", default="0-7", help="'0-7' or '0,3,5'")
    for name in ("tokenizer", "demo-tokenizer"):
        commands.choices[name].add_argument(
            "--set", dest="overrides", action="append", default=[], help="a tokenizer config key=value"
        )
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
