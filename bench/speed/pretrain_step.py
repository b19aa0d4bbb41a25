"""The pre-training step with cached targets against online tokenization, on device-resident
synthetic batches, so the ratio measures the tokenizer's cost alone (no DALI, no store: this runs
in the first call of a GPU window).

    python bench/speed/pretrain_step.py                                   # CPU rehearsal: tiny ViT, small dVAE
    python bench/speed/pretrain_step.py --model base --batch 256 --json out.json    # GPU: ViT-B, released dVAE

Both arms run `pretrain.MIMStep`, the trainer's own step (copies, static-shape forward and loss,
backward, clipping, fused AdamW on a GPU), on the same weights and batches; the online arm also
tokenizes each batch's 112 px twin view with the dVAE under the policy `beit tokenize` uses
(`dvae.Precision` from TokenizeConfig), as `--targets online` does. Rounds alternate between the
arms; each reports its median step time. With --compile the pair runs again with the model
compiled; the JSON is rewritten after each pair. Count first: the online arm adds the encoder's FLOPs per
image (52.1 GFLOP at 112 px for the released dVAE) to the ViT's training FLOPs (train_step.py's
count), so ViT-B's bound is (ViT + dVAE) / ViT = 1.48x at 75 masked patches.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dvae import encoder_flops  # noqa: E402
from train_step import matmul_peak, train_flops_per_image  # noqa: E402

from beit.shared.counter import counter_key  # noqa: E402
from beit.shared.dvae import DVAE, DVAEConfig, Precision  # noqa: E402
from beit.tokenize.stage1 import TokenizeConfig  # noqa: E402
from beit.train.model import BeitForMIM, ModelConfig  # noqa: E402
from beit.train.pretrain.data import Batch  # noqa: E402
from beit.train.pretrain.masking import block_masks, masked_positions  # noqa: E402
from beit.train.pretrain.trainer import MIMStep, PretrainConfig, param_groups  # noqa: E402


def batches(count: int, batch: int, model: BeitForMIM, twin: int, device: torch.device) -> list[Batch]:
    """`count` distinct batches on `device`: pixels, twin views, the masks training draws padded to 75."""
    grid = model.cfg.grid
    out = []
    for i in range(count):
        masks = block_masks(counter_key(0, i, np.arange(batch), 2), grid, 75, min_block=16).reshape(batch, -1)
        positions, valid = masked_positions(masks, 75)
        out.append(
            Batch(
                pixels=torch.randn(batch, 3, model.cfg.image_size, model.cfg.image_size, device=device),
                tokens=torch.randint(0, model.cfg.vocab_size, (batch, grid[0] * grid[1]), device=device),
                mask=torch.from_numpy(masks).to(device),
                positions=torch.from_numpy(positions).to(device),
                valid=torch.from_numpy(valid).to(device),
                images=np.arange(batch),
                twin=torch.rand(batch, 3, twin, twin, device=device),
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="ViT preset (default: base on GPU, tiny on CPU)")
    parser.add_argument("--depth", type=int, default=0, help="blocks (default: the preset's; fewer: a quick rehearsal)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=0, help="default 256 on GPU, 4 on CPU")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per arm (default 20 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first (default 5 GPU, 1 CPU)")
    parser.add_argument("--dvae", default="", help="released | small (default: released on GPU, small on CPU)")
    parser.add_argument(
        "--compile", action="store_true", help="then again with the model compiled, as `--set compile=true` runs it"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = args.model or ("base" if cuda else "tiny")
    batch = args.batch or (256 if cuda else 4)
    steps, warmup = args.steps or (20 if cuda else 3), args.warmup or (5 if cuda else 1)
    dvae_size = args.dvae or ("released" if cuda else "small")
    torch.manual_seed(0)
    model = BeitForMIM(ModelConfig(preset=preset, depth=args.depth)).to(device)
    dvae_cfg = DVAEConfig() if dvae_size == "released" else DVAEConfig(n_hid=32, vocab_size=8192)
    tokenizer = DVAE(dvae_cfg, with_decoder=False).eval()
    dvae_flops = encoder_flops(tokenizer, 112)
    tokenizer = tokenizer.to(device)
    precision = Precision.resolve(TokenizeConfig.precision, TokenizeConfig.tf32, device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, fused=cuda)
    data = batches(4, batch, model, 112, device)
    vit_flops = train_flops_per_image(model.cfg, 75.0)
    peak = matmul_peak(device) if cuda else None
    machine = (
        torch.cuda.get_device_name(device) if cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    bound = (vit_flops + dvae_flops) / vit_flops
    result = {
        "device": machine,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "model": f"{preset}, depth {args.depth}" if args.depth else preset,
        "dvae": dvae_size,
        "precision": {"body": precision.body, "tf32": precision.tf32},
        "batch": batch,
        "steps": steps,
        "flop_bound": bound,
        "runs": {},
    }
    print(f"device: {machine}; ViT-{preset} batch {batch}, dVAE {dvae_size} ({precision.body}, tf32 {precision.tf32})")
    print(f"{'run':<9} {'arm':<8} {'ms/step':>9} {'img/s':>9} {'GFLOP/img':>10} {'MFU':>6}", flush=True)
    for mode in ("eager", "compiled") if args.compile else ("eager",):
        cfg = PretrainConfig(compile=mode == "compiled")
        arms = {
            "cached": MIMStep(model, model, optimizer, cfg, device),
            "online": MIMStep(model, model, optimizer, cfg, device, online=(tokenizer, precision)),
        }
        times: dict[str, list[float]] = {name: [] for name in arms}
        for i in range(warmup + steps):
            for name, step in arms.items():
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step(lambda i=i: data[i % len(data)], 1e-4)
                if cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
        rows = {}
        for name, values in times.items():
            median = statistics.median(values)
            flops = vit_flops + (dvae_flops if name == "online" else 0.0)
            rows[name] = {"median_step_s": median, "images_per_s": batch / median, "gflops_per_image": flops / 1e9}
            if peak:
                rows[name]["mfu"] = flops * batch / median / peak
            mfu = f"{rows[name]['mfu'] * 100:5.1f}%" if "mfu" in rows[name] else "     -"
            ms, rate, gflops = median * 1e3, batch / median, flops / 1e9
            print(f"{mode:<9} {name:<8} {ms:9.1f} {rate:9.1f} {gflops:10.1f} {mfu}")
        ratio = rows["cached"]["images_per_s"] / rows["online"]["images_per_s"]
        result["runs"][mode] = {"arms": rows, "cached_over_online": ratio}
        print(f"{mode:<9} cached / online: {ratio:.2f}x (FLOP bound {bound:.2f}x)", flush=True)
        if args.json:  # after each run: a later one cut by a time limit leaves this one
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
