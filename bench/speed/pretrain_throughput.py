"""Pre-training throughput: cached targets against online tokenization (the reference code's
way), same model, batch and data, in one run; and the input pipeline alone.

    python bench/speed/pretrain_throughput.py                              # CPU: tiny and small, released-size dVAE
    python bench/speed/pretrain_throughput.py --models base --batch 256 --images 4096 --steps 30 --json out.json  # GPU

A store is made first with `beit tokenize` (V = 2) from realistic JPEGs (bench/speed/jpegs.py: 500x375,
q90, cut from scikit-image's photos) with the released-size dVAE architecture (random weights:
the cost is what matters here), unless --store names one (a GPU window reuses the store
bench/speed/tokenize_throughput.py made; online targets use the tokenizer it records). Then
`beit pretrain` runs twice per model, `--targets cached` and `--targets online`, for 2 x STEPS
steps; the second logged interval (STEPS steps, after the
warm-up interval) gives images/s and the data-wait fraction. The input pipeline alone is timed
by drawing the same batches without a model. On a GPU, MFU = model FLOPs (train_step.py's
count) x images/s / the bf16 matmul peak measured in the same run. The runs save no checkpoint,
and the JSON is written after each measurement.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from jpegs import make_jpegs  # noqa: E402
from train_step import matmul_peak, train_flops_per_image  # noqa: E402

from beit.shared.decode import dali_threads  # noqa: E402
from beit.shared.dvae import DVAE, DVAEConfig, save_tokenizer  # noqa: E402
from beit.tokenize.stage1 import TokenizeConfig, tokenize  # noqa: E402
from beit.train.model import ModelConfig  # noqa: E402
from beit.train.pretrain.data import PretrainData, Sampling  # noqa: E402
from beit.train.pretrain.trainer import PretrainConfig, pretrain  # noqa: E402


def timed_interval(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--batch", type=int, default=0, help="default 256 on GPU, 8 on CPU")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default 30 GPU, 4 CPU)")
    parser.add_argument("--images", type=int, default=0, help="default 4096 GPU, 32 CPU")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--jpegs", type=Path, help="the JPEG folder (bench/speed/jpegs.py; made or grown as needed)")
    parser.add_argument("--store", type=Path, help="an existing store to train from (its tokenizer for online)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    batch = args.batch or (256 if cuda else 8)
    steps = args.steps or (30 if cuda else 4)
    images = args.images or (4096 if cuda else 32)
    threads = 0  # the commands' default: this rank's share of the cores (decode.dali_threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="beit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    store = args.store or work / "store.zarr"
    if not args.store and not store.exists():
        files = make_jpegs(args.jpegs or work / "images", images)
        listed = work / "images-listed.txt"
        listed.write_text("".join(f"{f}\n" for f in files))
        torch.manual_seed(0)
        tokenizer = work / "dvae.safetensors"
        save_tokenizer(DVAE(DVAEConfig(), with_decoder=False), tokenizer, input_size=112)
        tokenize(
            listed,
            str(store),
            tokenizer,
            TokenizeConfig(views=2, batch_size=min(batch, 64), chunk_images=256, threads=threads),
            progress=False,
        )
    device = torch.cuda.get_device_name() if cuda else f"CPU, {dali_threads(0)} DALI threads"
    peak = matmul_peak(torch.device("cuda")) if cuda else None
    print(f"device: {device}; batch {batch}; {steps} timed steps after {steps} warm-up steps; released-size dVAE")

    data = PretrainData(str(store), Sampling(batch, seed=0), twin=False, threads=threads, device_id=0 if cuda else None)
    for step in range(2):
        data.batch(step)
    start = time.perf_counter()
    for step in range(2, 2 + steps):
        data.batch(step)
    pipeline = batch * steps / (time.perf_counter() - start)
    print(f"input pipeline alone: {pipeline:8.1f} images/s", flush=True)

    def write() -> None:  # after each measurement: a run cut by a time limit keeps what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2, default=float))

    results = {
        "device": device,
        "command": " ".join(sys.argv),
        "store": str(store),
        "batch": batch,
        "steps": steps,
        "pipeline_images_per_s": pipeline,
        "peak_flops": peak,
        "date": time.strftime("%Y-%m-%d"),
        "models": {},
    }
    write()
    for preset in args.models.split(","):
        epochs = 2 * steps / data.steps_per_epoch
        rates = {}
        for targets in ("cached", "online"):
            run = work / f"run-{preset}-{targets}"
            shutil.rmtree(run, ignore_errors=True)
            cfg = PretrainConfig(
                model=ModelConfig(preset=preset, image_size=0, vocab_size=0),
                epochs=epochs,
                batch_size=batch,
                warmup_epochs=0,
                targets=targets,
                log_every=steps,
                checkpoint_every=10**9,
                threads=threads,
            )
            pretrain(str(store), run, cfg, resume=False, progress=False, save=False)  # no 1 GB checkpoint
            row = timed_interval(run)
            rates[targets] = row
            mfu = ""
            if peak:
                flops = train_flops_per_image(ModelConfig(preset=preset), 74.5)
                row["mfu"] = flops * row["images_per_s"] / peak
                mfu = f", MFU {row['mfu'] * 100:.1f}%"
            print(
                f"{preset:>6} {targets:>6}: {row['images_per_s']:8.1f} images/s, data wait "
                f"{row['data_wait'] * 100:.0f}%{mfu}",
                flush=True,
            )
            results["models"][preset] = dict(rates)
            write()
        ratio = rates["cached"]["images_per_s"] / rates["online"]["images_per_s"]
        print(f"{preset:>6} cached / online: {ratio:.2f}x")
        results["models"][preset] = {**rates, "ratio": ratio}
        write()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
