"""Time BEiT's pre-training step (forward + backward + AdamW), ours and Hugging Face's, side by side.

    python bench/train_step.py                          # tiny and base, CPU or the GPU if there is one
    python bench/train_step.py --models base --batch 256 --compile --json out.json   # on a GPU
    python bench/train_step.py --demo                   # the short CPU run `make demo` does

Both models get the same configuration, weights, pixels, blockwise masks and targets; their steps
alternate round by round, and each reports the median step time. Ours is exactly the trainer's
step (`pretrain.mim_step_loss`: static shapes, the masked patches padded to 75 per image; with
--compile the model is compiled as the trainer compiles it). Work is counted first:
model FLOPs per image = 3 x the forward's matmul FLOPs (patch embed, attention, MLP, and the
MIM head on the masked patches only); on a GPU, MFU = achieved model FLOP/s over the bf16
matmul peak measured in the same run. Transformers' BEiT is run through its own modules with
its MIM head applied to the masked patches only, as ours is, so both do the counted work.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from beit.shared.counter import counter_key  # noqa: E402
from beit.shared.masking import block_masks, masked_positions  # noqa: E402
from beit.shared.model import BeitForMIM, ModelConfig  # noqa: E402
from beit.train.pretrain import mim_step_loss  # noqa: E402


def train_flops_per_image(cfg: ModelConfig, masked: float) -> float:
    """3 x forward matmul FLOPs of BeitForMIM for one image with `masked` masked patches."""
    cfg = cfg.resolved()
    n = cfg.grid[0] * cfg.grid[1]
    tokens, d = n + 1, cfg.width
    hidden = int(d * cfg.mlp_ratio)
    per_block = 2 * tokens * (3 * d * d + d * d + 2 * d * hidden) + 2 * 2 * tokens * tokens * d
    forward = cfg.depth * per_block + 2 * n * d * 3 * cfg.patch_size**2 + 2 * masked * d * cfg.vocab_size
    return 3.0 * forward


def matmul_peak(device: torch.device, dtype=torch.bfloat16, size: int = 8192, reps: int = 20) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size**3 / statistics.median(times)


class Stepper:
    """One model with its optimizer; `step()` runs one training step on fixed inputs.
    `forward(model, pixels, mask, targets)` gives the loss; with `use_compile`, `compile_part`
    ("model": the model alone, as the trainer compiles it; "step": the whole loss function) is
    compiled."""

    def __init__(self, name, model, forward, device, use_compile: bool, compile_part: str = "model"):
        self.name = name
        self.model = model.to(device).train()
        compiled_model = torch.compile(self.model) if use_compile and compile_part == "model" else self.model

        def loss(pixels, mask, targets):
            return forward(compiled_model, pixels, mask, targets)

        self.forward = torch.compile(loss) if use_compile and compile_part == "step" else loss
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, weight_decay=0.05, fused=device.type == "cuda"
        )
        self.device = device
        self.times: list[float] = []

    def step(self, pixels, mask, targets) -> None:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = self.forward(pixels, mask, targets)
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - start)


def bench_model(preset: str, batch: int, steps: int, warmup: int, device, use_compile: bool, peer: bool, peak):
    cfg = ModelConfig(preset=preset)
    ours = BeitForMIM(cfg)
    grid = ours.cfg.grid
    # the masks training draws (SamplePlan: batched block_masks, BEiT's 75 of 196 and 16-patch blocks),
    # and the trainer's static shapes: each image's masked patches padded to 75
    masks = block_masks(counter_key(0, 0, np.arange(batch), 2), grid, 75, min_block=16).reshape(batch, -1)
    positions, valid = (torch.from_numpy(a).to(device) for a in masked_positions(masks, 75))
    mask = torch.from_numpy(masks)
    pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    targets = torch.randint(0, ours.cfg.vocab_size, (batch, grid[0] * grid[1]))
    pixels, mask, targets = pixels.to(device), mask.to(device), targets.to(device)

    def ours_forward(model, pixels, mask, targets):  # exactly the trainer's step: pretrain.mim_step_loss
        return mim_step_loss(model, pixels, mask, positions, valid, targets, ours.cfg.patch_size)[0]

    steppers = [Stepper("beit (ours)", ours, ours_forward, device, use_compile)]
    if peer:
        from hf_reference import huggingface_twin

        hf = huggingface_twin(ours, drop_path=ours.cfg.drop_path)

        def hf_forward(model, pixels, mask, targets):
            # its own modules, with the head on the masked patches only, as ours: the same work
            hidden = model.beit(pixel_values=pixels, bool_masked_pos=mask).last_hidden_state[:, 1:]
            logits = model.lm_head(model.layernorm(hidden[mask]))
            return torch.nn.functional.cross_entropy(logits.float(), targets[mask])

        steppers.append(Stepper("transformers BEiT", hf, hf_forward, device, use_compile, compile_part="step"))

    for i in range(warmup + steps):
        for stepper in steppers:
            stepper.step(pixels, mask, targets)
            if i < warmup:
                stepper.times.clear()

    flops = train_flops_per_image(cfg, float(mask.sum(1).float().mean()))
    rows = []
    for stepper in steppers:
        median = statistics.median(stepper.times)
        row = {
            "model": preset,
            "implementation": stepper.name,
            "batch": batch,
            "steps": steps,
            "median_step_s": median,
            "images_per_s": batch / median,
            "gflops_per_image": flops / 1e9,
        }
        if peak:
            row["mfu"] = flops * batch / median / peak
        rows.append(row)
    if peer:
        rows[0]["speed_vs_transformers"] = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=0, help="default: 256 on GPU; 16 tiny / 4 base on CPU")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: 20 GPU, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first (default: 5 GPU, 1 CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models' steps")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers' BEiT")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--demo", action="store_true", help="tiny model, CPU, a few steps")
    args = parser.parse_args()
    if args.demo:
        args.models, args.device, args.steps, args.warmup = "tiny", "cpu", 4, 1

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    peer = not args.no_peer
    if peer:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed: timing ours alone (pip install -e '.[dev]' for the peer)")
            peer = False
    torch.manual_seed(0)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = matmul_peak(device) if on_gpu else None
    if on_gpu:
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    peak_text = f"; bf16 matmul peak {peak / 1e12:.0f} TFLOP/s" if peak else ""
    print(f"device: {machine}; torch {torch.__version__}{peak_text}")

    results = []
    for preset in args.models.split(","):
        batch = args.batch or (256 if on_gpu else {"tiny": 16}.get(preset, 4))
        steps = args.steps or (20 if on_gpu else 5)
        warmup = args.warmup or (5 if on_gpu else 1)
        rows = bench_model(preset, batch, steps, warmup, device, args.compile, peer, peak)
        results.extend(rows)
        for row in rows:
            line = (
                f"{row['model']:>5}  {row['implementation']:<18} batch {row['batch']:>4}  "
                f"{row['median_step_s'] * 1e3:9.1f} ms/step  {row['images_per_s']:9.1f} img/s  "
                f"{row['gflops_per_image']:.1f} GFLOP/img"
            )
            if "mfu" in row:
                line += f"  MFU {row['mfu'] * 100:.1f}%"
            if "speed_vs_transformers" in row:
                line += f"  ({row['speed_vs_transformers']:.2f}x transformers)"
            print(line, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "device": machine,
            "torch": torch.__version__,
            "peak_flops": peak,
            "compile": args.compile,
            "date": time.strftime("%Y-%m-%d"),
            "results": results,
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
