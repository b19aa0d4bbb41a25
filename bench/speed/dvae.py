"""dVAE encoder throughput (views/s at 112 px) under each precision policy (`dvae.Precision`:
the body in fp32, bf16 or fp16, TF32 on or off), and how often its argmax agrees with strict
fp32's; the row "beit tokenize default" is the policy the command runs (TokenizeConfig).

    python bench/speed/dvae.py                                  # released architecture, CPU or GPU
    python bench/speed/dvae.py --tokenizer tok.safetensors      # a real tokenizer's weights
    python bench/speed/dvae.py --batch 256 --json out.json      # GPU

Count first: the released encoder at 112 px is 26.1 GMACs = 52.1 GFLOPs per view (DESIGN.md),
so an H100's ~790 TFLOP/s bf16 bounds it near 15,000 views/s. Timing: warm-up, then the median
of repeated batches (CUDA-synchronised on a GPU); the JSON is rewritten after each policy. Last,
the default policy again with cudnn.benchmark on (the encoder's shapes are fixed), and the share of
its tokens equal to the default's. Agreement is measured on the same inputs:
real photos from scikit-image when it is installed (random crops), random pixels otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from beit.shared.dvae import DVAE, DVAEConfig, Precision, load_tokenizer, map_pixels
from beit.tokenize.stage1 import TokenizeConfig


def encoder_flops(model: DVAE, size: int) -> float:
    """Multiply-adds x 2 of the encoder's convolutions for one view, counted with hooks."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        total += 2 * output.numel() * module.in_channels * k

    handles = [m.register_forward_hook(hook) for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.encoder(torch.zeros(1, 3, size, size))
    for handle in handles:
        handle.remove()
    return float(total)


def photo_batch(batch: int, size: int) -> torch.Tensor:
    """Random crops of scikit-image's photos in [0, 1], or random pixels without it."""
    try:
        import importlib.util

        from PIL import Image

        folder = Path(next(iter(importlib.util.find_spec("skimage").submodule_search_locations))) / "data"
        photos = [
            np.asarray(Image.open(folder / n).convert("RGB"))
            for n in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg")
        ]
    except Exception:
        return torch.rand(batch, 3, size, size)
    rng = np.random.default_rng(0)
    crops = []
    for i in range(batch):
        photo = photos[i % len(photos)]
        side = int(rng.integers(size, min(photo.shape[:2]) + 1))
        y, x = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
        crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.LANCZOS)
        crops.append(np.asarray(crop))
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255


def time_batches(fn, reps: int, cuda: bool) -> float:
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tokenizer", type=Path, help="a tokenizer file (default: released architecture, random weights)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=0, help="default 256 on GPU, 8 on CPU")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--reps", type=int, default=0, help="timed batches (default 20 GPU, 3 CPU)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (256 if cuda else 8)
    reps = args.reps or (20 if cuda else 3)
    torch.manual_seed(0)
    model = load_tokenizer(args.tokenizer) if args.tokenizer else DVAE(DVAEConfig(), with_decoder=False).eval()
    flops = encoder_flops(model, args.size)
    model = model.to(device)
    pixels = photo_batch(batch, args.size).to(device)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; encoder {flops / 1e9:.1f} GFLOP/view at {args.size} px; batch {batch}")

    # the policies: strict fp32 (the reference), what `beit tokenize` runs by default, and the others
    command = Precision.resolve(TokenizeConfig.precision, TokenizeConfig.tf32, device)
    policies = {"fp32 (reference)": Precision("fp32", False), "beit tokenize default": command}
    for body in ("fp32", "bf16", "fp16"):
        for tf32 in (False, True) if cuda else (False,):
            policy = Precision(body, tf32)
            if policy not in policies.values():
                policies[f"{body}{' + tf32' if tf32 else ''}"] = policy
    results, tokens = {}, {}
    payload = {
        "device": name,
        "batch": batch,
        "size": args.size,
        "tokenizer": str(args.tokenizer or "released architecture, random weights"),
        "gflops_per_view": flops / 1e9,
        "command_policy": asdict(command),
        "command": " ".join(sys.argv),
        "results": results,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"{'policy':<40} {'body':>5} {'tf32':>5} {'views/s':>10} {'TFLOP/s':>8} {'agree w/ fp32':>14}", flush=True)

    def measure(label: str, policy: Precision, benchmark: bool = False) -> None:
        """Time one policy and write the JSON at once (a cut run keeps the policies measured)."""
        torch.backends.cudnn.benchmark = benchmark
        run = lambda: tokens.__setitem__(label, policy.tokenize(model, pixels))  # noqa: E731
        for _ in range(2 if cuda else 1):
            run()
        seconds = time_batches(run, reps, cuda)
        views = batch / seconds
        row = {**asdict(policy), "cudnn_benchmark": benchmark, "views_per_s": views, "tflops": views * flops / 1e12}
        row["agreement"] = (tokens[label] == tokens["fp32 (reference)"]).float().mean().item()
        results[label] = row
        print(
            f"{label:<40} {row['body']:>5} {str(row['tf32']):>5} {views:10.1f} {row['tflops']:8.2f} "
            f"{row['agreement'] * 100:13.2f}%",
            flush=True,
        )
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(payload, indent=2))

    for label, policy in policies.items():
        measure(label, policy)
    # cudnn.benchmark on the encoder's fixed shapes: kept for `beit tokenize` only if it is faster
    # and gives the very same tokens as the default policy without it
    measure("beit tokenize default + cudnn.benchmark", command, benchmark=True)
    same = (tokens["beit tokenize default + cudnn.benchmark"] == tokens["beit tokenize default"]).float().mean()
    results["beit tokenize default + cudnn.benchmark"]["same_tokens_as_default"] = same.item()
    torch.backends.cudnn.benchmark = False
    with torch.no_grad():
        margin = model.encoder(map_pixels(pixels)).float().topk(2, dim=1).values
    payload["median_top2_margin"] = (margin[:, 0] - margin[:, 1]).median().item()
    print(f"cudnn.benchmark: {same.item() * 100:.2f}% of tokens equal to the default policy's")
    print(f"median top-2 logit margin {payload['median_top2_margin']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
