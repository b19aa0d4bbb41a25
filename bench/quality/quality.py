"""The quality experiment: the BEiT paper's comparisons at small scale, on Fashion-MNIST.

    python bench/quality/quality.py --size cpu [--work runs/quality-cpu] [--source DIR] [--jobs 2]
    python bench/quality/quality.py --size gpu [--work runs/quality-gpu] [--jobs 2]

One dVAE tokenizer and one store of V = 10 views per image serve every pre-training run:
  - BEiT (visual-token targets, blockwise masks, all 10 cached views)
  - the same with only the first 1 or 4 cached views (`--set views=K`: the views are drawn per
    (seed, image, view), so the first K are exactly a V = K store's)
  - pixel regression of the masked patches (`--targets pixels`), the paper's ablation
  - random instead of blockwise masks (`--mask random`)
  - online tokenization (`--targets online`): the dVAE runs on every step, as the reference code does
Every pre-training run has the same budget (epochs, batch, lr). Then each is fine-tuned with the
same budget (a fixed number of steps; layer-wise lr decay only for pre-trained weights) on 10% of
the pre-training images' labels, and BEiT and a from-scratch model on 1%, 10% and 100% of them;
top-1 on the validation images (the last epoch's, not the best).

--source: the official Fashion-MNIST idx files (default /usr/share/datasets/fashion-mnist when it is
there: 60,000 train, 10,000 test); without them the shipped 8,000 / 2,000 subset is used. Runs
resume: re-running the same command skips what is done and continues a run cut off (each
`beit` run resumes from its last checkpoint), so the GPU size can go in several calls of
`timeout 570 python bench/quality/quality.py --size gpu`. --pretrain-epochs and --finetune-steps change
the budget of every run alike (use a new --work for another budget). Results: WORK/results.json and a
Markdown table on stdout. Independent runs go --jobs at a time, the cores split between them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FULL = Path("/usr/share/datasets/fashion-mnist")

SIZES = {
    # 2 CPU cores: about 45 minutes. A 4-layer width-128 ViT on 28 px images (7x7 patches of 4).
    "cpu": dict(
        image=28,
        images=10_000,
        val=10_000,
        model=dict(width=128, depth=4, heads=4),
        tokenizer=dict(steps=400, batch=64, n_hid=32, vocab=512),
        views=10,
        tokenize_batch=64,
        pretrain=dict(epochs=6, batch=64, lr=3e-3, warmup=1),
        finetune=dict(steps=300, batch=64, lr=2e-3, layer_decay=0.75),
        fractions=(0.01, 0.1, 1.0),
    ),
    # one GPU: ViT-S widths on all 60,000 training images. Counted (torch's FLOP counter): 6.56
    # GFLOP per pre-training sample and 6.51 per fine-tuning sample (50 tokens of width 384, 12
    # layers); 6 runs x 30 epochs x 60,000 and 10 x 1,500 steps x 256 make 9.6e16 FLOP, 8 minutes
    # at 20% of an H100's bf16 peak. It fits one session's device time in two 10-minute calls.
    "gpu": dict(
        image=28,
        images=60_000,
        val=10_000,
        model=dict(width=384, depth=12, heads=6),
        tokenizer=dict(steps=5000, batch=256, n_hid=64, vocab=1024),
        views=10,
        tokenize_batch=256,
        pretrain=dict(epochs=30, batch=256, lr=1.5e-3, warmup=3),
        finetune=dict(steps=1500, batch=256, lr=2e-3, layer_decay=0.75),
        fractions=(0.01, 0.1, 1.0),
    ),
}

PRETRAIN_RUNS = {  # name -> extra `beit pretrain` arguments
    "beit-v10": "",
    "beit-v4": "--set views=4",
    "beit-v1": "--set views=1",
    "pixels": "--targets pixels",
    "random-mask": "--set mask=random",
    "online": "--targets online",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--source", type=Path, default=FULL if FULL.is_dir() else None)
    parser.add_argument("--jobs", type=int, default=2 if not _cuda() else 1)
    parser.add_argument("--pretrain-epochs", type=int, help="instead of the size's (every pre-training run)")
    parser.add_argument("--finetune-steps", type=int, help="instead of the size's (every fine-tuning run)")
    args = parser.parse_args()
    size = SIZES[args.size]
    if args.pretrain_epochs:
        size["pretrain"]["epochs"] = args.pretrain_epochs
    if args.finetune_steps:
        size["finetune"]["steps"] = args.finetune_steps
    work = (args.work or ROOT / "runs" / f"quality-{args.size}").resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    times: dict[str, float] = {}

    def beit(name: str, line: str, parallel: bool = False) -> str:
        """Run `beit LINE` (paths in it shlex-quoted), its stderr in logs/NAME.log; its stdout back."""
        env = dict(os.environ)
        if parallel and args.jobs > 1:
            env["OMP_NUM_THREADS"] = str(threads)
            line += f" --set threads={threads}"
        command = [sys.executable, "-m", "beit", *shlex.split(line)]
        log = work / "logs" / f"{name}.log"
        start = time.perf_counter()
        with open(log, "w") as handle:
            handle.write(shlex.join(command) + "\n")
            handle.flush()
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=handle, text=True)
        times[name] = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"{name} failed (exit {done.returncode}): see {log}")
        last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        print(f"  {name}: {times[name]:.0f} s  {last}")
        return done.stdout

    def pool(jobs: list[tuple[str, str]]) -> None:
        with ThreadPoolExecutor(args.jobs) as executor:
            for future in [executor.submit(beit, name, line, True) for name, line in jobs]:
                future.result()

    s = size["image"]
    q = shlex.quote
    source = f"--source {q(str(args.source))}" if args.source else ""
    n_images = size["images"] if args.source else 8000
    n_val = size["val"] if args.source else 2000
    print(f"quality ({args.size}): {n_images} pre-training images, {n_val} validation images, work {work}")

    # the pre-training images, and class-balanced labelled sets of each fraction's size
    data = work / "data"
    if not (data / "train").is_dir():
        beit("data", f"data fashion-mnist {q(str(data))} --size {s} {source} --train {n_images} --val {n_val}")
    fractions = {}
    for fraction in size["fractions"]:
        count = round(n_images * fraction)
        folder = work / f"labels-{count}"
        if not (folder / "train").is_dir():
            line = f"data fashion-mnist {q(str(folder))} --size {s} {source} --train {count} --val {n_val} --seed 1"
            beit(f"labels-{count}", line)
        fractions[fraction] = folder

    t = size["tokenizer"]
    tokenizer = work / "tokenizer.safetensors"
    if not tokenizer.is_file():
        beit(
            "tokenizer",
            f"tokenizer train {q(str(data / 'train'))} -o {q(str(tokenizer))} --steps {t['steps']} --input-size {s} "
            f"--vocab-size {t['vocab']} --batch-size {t['batch']} --set group_count=3 --set n_hid={t['n_hid']} "
            f"--set n_init={t['n_hid']} --set warmup_steps=50 --set held_out=0.05 --set min_crop_area=0.5",
        )
    store = work / "store"
    beit(
        "tokenize",
        f"tokenize {q(str(data / 'train'))} {q(str(store))} --tokenizer {q(str(tokenizer))} --views {size['views']} "
        f"--set view.image_size={s} --set patch_size=4 --set view.scale=[0.5,1.0] "
        f"--batch-size {size['tokenize_batch']} --set chunk_images=500",
    )

    m, p, f = size["model"], size["pretrain"], size["finetune"]
    model = (
        f"--model tiny --set model.image_size={s} --set model.patch_size=4 --set model.width={m['width']} "
        f"--set model.heads={m['heads']} --set model.depth={m['depth']}"
    )

    def pretrain(name: str, extra: str) -> tuple[str, str]:
        return f"pretrain-{name}", (
            f"pretrain {q(str(store))} --out {q(str(work / f'pretrain-{name}'))} {model} --epochs {p['epochs']} "
            f"--batch-size {p['batch']} --lr {p['lr']} --warmup-epochs {p['warmup']} --set log_every=50 "
            f"--set model.drop_path=0.0 {extra}"
        )

    def finetune(name: str, init: str, labels: Path) -> tuple[str, str]:
        count = sum(1 for _ in (labels / "train").rglob("*.png"))
        epochs = max(1, round(f["steps"] / max(1, count // f["batch"])))  # the same number of steps for all
        # layer-wise lr decay only where there are pre-trained layers to keep; from scratch it only
        # slows the lower layers down
        decay = 1.0 if init == "none" else f["layer_decay"]
        return name, (
            f"finetune {q(str(labels))} --init {q(init)} --out {q(str(work / name))} {model} --epochs {epochs} "
            f"--batch-size {f['batch']} --lr {f['lr']} --layer-decay {decay} "
            f"--set warmup_epochs={max(epochs / 10, 0.1):g} --set randaugment=false --set mixup=0 --set cutmix=0 "
            f"--set erasing=0 --set model.drop_path=0.1 --set eval_every={epochs}"
        )

    def checkpoint(name: str) -> str:
        return str(work / f"pretrain-{name}" / "checkpoint.pt")

    # pre-training runs, and beside them the from-scratch fine-tunings (which need none)
    jobs = [pretrain(name, extra) for name, extra in PRETRAIN_RUNS.items()]
    jobs += [finetune(f"scratch-{_pct(fr)}", "none", folder) for fr, folder in fractions.items()]
    pool(jobs)
    jobs = [finetune(f"{name}-10pc", checkpoint(name), fractions[0.1]) for name in PRETRAIN_RUNS]
    jobs += [
        finetune(f"beit-v10-{_pct(fr)}", checkpoint("beit-v10"), folder)
        for fr, folder in fractions.items()
        if fr != 0.1
    ]
    pool(jobs)
    report(work, args, size, times, fractions)


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g}pc"


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report(work: Path, args, size: dict, times: dict, fractions: dict) -> None:
    def top1(run: str) -> float:
        return [r for r in _rows(work / run / "metrics.jsonl") if "eval_top1" in r][-1]["eval_top1"] * 100

    tokenizer = json.loads((work / "tokenizer.json").read_text())
    held = tokenizer["report"]["held_out"]
    stage1 = json.loads((work / "store.metrics.json").read_text())
    results = {
        "size": args.size,
        "source": str(args.source) if args.source else "shipped subset",
        "settings": size,
        "tokenizer": {"psnr": held["psnr"], "codes_used": held["codes_used"], "vocab": tokenizer["vocab_size"]},
        "tokenize_views_per_s": stage1["views_per_s"],
        "pretrain": {},
        "finetune": {},
        "seconds": times,
    }
    for name in PRETRAIN_RUNS:
        rows = _rows(work / f"pretrain-{name}" / "metrics.jsonl")
        last = rows[-1]
        results["pretrain"][name] = {
            "steps": last["step"],
            "loss": last["loss"],
            "mim_accuracy": last.get("mim_accuracy"),
            "images_per_s": sorted(r["images_per_s"] for r in rows)[len(rows) // 2],
        }
    for fr in fractions:
        pct = _pct(fr)
        results["finetune"][f"scratch-{pct}"] = top1(f"scratch-{pct}")
        results["finetune"][f"beit-v10-{pct}"] = top1(f"beit-v10-{pct}")
    for name in PRETRAIN_RUNS:
        results["finetune"][f"{name}-10pc"] = top1(f"{name}-10pc")
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    ft = results["finetune"]
    print(f"\ntokenizer: held-out PSNR {held['psnr']:.1f} dB, {held['codes_used']}/{tokenizer['vocab_size']} codes; "
          f"stage 1: {stage1['views_per_s']:.0f} views/s")  # fmt: skip
    print("\n| labels | BEiT (V = 10) | scratch | difference |\n| --- | --- | --- | --- |")
    for fr in fractions:
        pct = _pct(fr)
        b, sc = ft[f"beit-v10-{pct}"], ft[f"scratch-{pct}"]
        print(f"| {fr * 100:g}% | {b:.1f} | {sc:.1f} | {b - sc:+.1f} |")
    print("\n| pre-training (then 10% labels) | top-1 | masked-token acc. | pre-train img/s (median) |")
    print("| --- | --- | --- | --- |")
    for name in PRETRAIN_RUNS:
        pt = results["pretrain"][name]
        acc = f"{pt['mim_accuracy'] * 100:.1f}%" if pt["mim_accuracy"] is not None else "-"
        print(f"| {name} | {ft[f'{name}-10pc']:.1f} | {acc} | {pt['images_per_s']:.0f} |")
    print(f"| scratch | {ft['scratch-10pc']:.1f} | - | - |")
    print(f"\nresults in {work / 'results.json'}; jobs {args.jobs} at a time")


if __name__ == "__main__":
    main()
