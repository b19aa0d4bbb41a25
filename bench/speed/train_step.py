"""Time BEiT's pre-training step (forward + backward + AdamW), ours and Hugging Face's, side by side.

    python bench/speed/train_step.py                          # tiny and base, CPU or the GPU if there is one
    python bench/speed/train_step.py --models base --batch 256 --compile --json out.json   # on a GPU
    python bench/speed/train_step.py --demo                   # the short CPU run `make demo` does

Both models get the same configuration, weights, pixels, blockwise masks and targets; their steps
alternate round by round, and each reports the median step time. With --compile, ours is then
compiled and timed alone before the peer's compile starts, then both compiled side by side; the
JSON is rewritten after each of these, so a run cut by a time limit keeps what it measured.
Ours is exactly the trainer's step (`pretrain.mim_step_loss`: static shapes, the masked patches
padded to 75 per image; with --compile the model is compiled as the trainer compiles it). Work is counted first:
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from beit.shared.counter import counter_key  # noqa: E402
from beit.train.model import BeitForMIM, ModelConfig  # noqa: E402
from beit.train.pretrain.masking import block_masks, masked_positions  # noqa: E402
from beit.train.pretrain.trainer import mim_step_loss  # noqa: E402


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


OURS, PEER = "beit (ours)", "transformers BEiT"


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


def alternate(steppers: list[Stepper], inputs, warmup: int, steps: int) -> None:
    """`warmup` untimed then `steps` timed rounds, the steppers taking turns within each round."""
    for stepper in steppers:
        stepper.times.clear()
    for i in range(warmup + steps):
        for stepper in steppers:
            stepper.step(*inputs)
            if i < warmup:
                stepper.times.clear()


def bench_model(
    preset: str, depth: int, batch: int, steps: int, warmup: int, device, use_compile: bool, peer: bool, peak, report
):
    """Eager: ours and the peer side by side; then, with `use_compile`, ours compiled alone (timed
    before the peer's compile starts, so a slow peer compile cannot cost our figure), then the
    peer compiled beside ours compiled. After each, `report(measured rows, every row so far)`."""
    cfg = ModelConfig(preset=preset, depth=depth)
    ours = BeitForMIM(cfg)
    grid = ours.cfg.grid
    # the masks training draws (SamplePlan: batched block_masks, BEiT's 75 of 196 and 16-patch blocks),
    # and the trainer's static shapes: each image's masked patches padded to 75
    masks = block_masks(counter_key(0, 0, np.arange(batch), 2), grid, 75, min_block=16).reshape(batch, -1)
    positions, valid = (torch.from_numpy(a).to(device) for a in masked_positions(masks, 75))
    mask = torch.from_numpy(masks)
    pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    targets = torch.randint(0, ours.cfg.vocab_size, (batch, grid[0] * grid[1]))
    inputs = (pixels.to(device), mask.to(device), targets.to(device))
    flops = train_flops_per_image(cfg, float(mask.sum(1).float().mean()))

    def ours_forward(model, pixels, mask, targets):  # exactly the trainer's step: pretrain.mim_step_loss
        return mim_step_loss(model, pixels, mask, positions, valid, targets, ours.cfg.patch_size)[0]

    def hf_forward(model, pixels, mask, targets):
        # its own modules, with the head on the masked patches only, as ours: the same work
        hidden = model.beit(pixel_values=pixels, bool_masked_pos=mask).last_hidden_state[:, 1:]
        logits = model.lm_head(model.layernorm(hidden[mask]))
        return torch.nn.functional.cross_entropy(logits.float(), targets[mask])

    rows: dict[tuple[str, bool], dict] = {}

    def record(stepper: Stepper, compiled: bool) -> None:
        median = statistics.median(stepper.times)
        row = {
            "model": f"{preset}, depth {depth}" if depth else preset,
            "implementation": stepper.name,
            "compiled": compiled,
            "batch": batch,
            "steps": len(stepper.times),
            "median_step_s": median,
            "images_per_s": batch / median,
            "gflops_per_image": flops / 1e9,
        }
        if peak:
            row["mfu"] = flops * batch / median / peak
        rows[stepper.name, compiled] = row
        for key, theirs in rows.items():  # ours over the peer, each at the same compile setting
            if key[1] == compiled and key[0] != OURS and (OURS, compiled) in rows:
                rows[OURS, compiled]["speed_vs_transformers"] = (
                    rows[OURS, compiled]["images_per_s"] / theirs["images_per_s"]
                )

    def measured(steppers: list[Stepper], compiled: bool) -> None:
        for stepper in steppers:
            record(stepper, compiled)
        report([rows[stepper.name, compiled] for stepper in steppers], list(rows.values()))

    eager = [Stepper(OURS, ours, ours_forward, device, False)]
    if peer:
        from hf_reference import huggingface_twin

        hf = huggingface_twin(ours, drop_path=ours.cfg.drop_path)
        eager.append(Stepper(PEER, hf, hf_forward, device, False))
    alternate(eager, inputs, warmup, steps)
    measured(eager, False)
    if not use_compile:
        return list(rows.values())
    # the compiled steppers share the eager ones' modules (and so their weights)
    compiled = [Stepper(OURS, eager[0].model, ours_forward, device, True)]
    alternate(compiled, inputs, warmup, steps)
    measured(compiled, True)
    if peer:
        compiled.append(Stepper(PEER, eager[1].model, hf_forward, device, True, compile_part="step"))
        alternate(compiled, inputs, warmup, steps)
        measured(compiled, True)
    return list(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,base")
    parser.add_argument("--depth", type=int, default=0, help="blocks (default: the preset's; fewer: a quick rehearsal)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=0, help="default: 256 on GPU; 16 tiny / 4 base on CPU")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: 20 GPU, 5 CPU)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first (default: 5 GPU, 1 CPU)")
    parser.add_argument(
        "--compile", action="store_true", help="then both compiled: ours first, alone, then the peer beside it"
    )
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

    payload = {
        "device": machine,
        "torch": torch.__version__,
        "peak_flops": peak,
        "compile": args.compile,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "results": [],
    }
    finished: list[dict] = []  # the rows of the models before this one

    def report(fresh: list[dict], rows: list[dict]) -> None:
        """Print the rows just measured, and rewrite the JSON: a step cut later keeps these."""
        for row in fresh:
            line = (
                f"{row['model']:>5}  {row['implementation']:<18} {'compiled' if row['compiled'] else 'eager':<8} "
                f"batch {row['batch']:>4}  {row['median_step_s'] * 1e3:9.1f} ms/step  "
                f"{row['images_per_s']:9.1f} img/s  {row['gflops_per_image']:.1f} GFLOP/img"
            )
            if "mfu" in row:
                line += f"  MFU {row['mfu'] * 100:.1f}%"
            if "speed_vs_transformers" in row:
                line += f"  ({row['speed_vs_transformers']:.2f}x transformers)"
            print(line, flush=True)
        payload["results"] = finished + rows
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(payload, indent=2))

    for preset in args.models.split(","):
        batch = args.batch or (256 if on_gpu else {"tiny": 16}.get(preset, 4))
        steps = args.steps or (20 if on_gpu else 5)
        warmup = args.warmup or (5 if on_gpu else 1)
        finished.extend(bench_model(preset, args.depth, batch, steps, warmup, device, args.compile, peer, peak, report))


if __name__ == "__main__":
    main()
