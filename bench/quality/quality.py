"""The quality experiments: the BEiT paper's comparisons at small scale, on Fashion-MNIST, one
entry point with presets.

    python bench/quality/quality.py --preset cpu [--work runs/quality-cpu] [--source DIR] [--jobs 2]
    python bench/quality/quality.py --preset gpu [--work runs/quality-gpu] [--jobs 1]
    python bench/quality/quality.py --preset quick                      # about 25 minutes, shipped subset
    python bench/quality/quality.py --preset views --reuse runs/quality-cpu
    python bench/quality/quality.py --preset longer --reuse runs/quality-cpu

A preset (PRESETS) names the data, the tokenizer, the views per image, one pre-training budget,
the pre-training arms (name -> extra `beit pretrain` arguments), one fine-tuning budget, and which
fine-tunings run: every arm on the `main` label count, and BEiT (the first arm) and scratch on
each of `labels`. The arms of `cpu` and `gpu`:
  - BEiT (visual-token targets, blockwise masks, all 10 cached views)
  - the same with only the first 1 or 4 cached views (`--set views=K`: the views are drawn per
    (seed, image, view), so the first K are exactly a V = K store's)
  - pixel regression of the masked patches (`--targets pixels`: since 2026-12-02 the paper's raw
    pixels; the figures recorded before then regressed per-patch normalised pixels, now
    `--targets normalised-pixels`)
  - random instead of blockwise masks (`--mask random`)
  - online tokenization (`--targets online`): the dVAE runs on every step, as the reference code does
`quick` is BEiT against scratch on 10% of the shipped subset's labels; `views` asks whether V
matters once each view repeats many times (2,000 images, 30 epochs: V = 10 against V = 1);
`longer` gives the `cpu` arms four times the pre-training. The paper's ablation table, with
paired seeds and confidence intervals, is bench/quality/ablation.py. Every pre-training run of a preset has
the same budget (epochs, batch, lr), every fine-tuning the same number of steps (layer-wise lr
decay only for pre-trained weights); top-1 on the validation images (the last evaluation's).

--source: the official Fashion-MNIST idx files (default /usr/share/datasets/fashion-mnist when it is
there: 60,000 train, 10,000 test); without them the shipped 8,000 / 2,000 subset is used. --reuse
DIR takes the data, labelled sets, tokenizer and store from an earlier run's folder (made there
when missing). Runs resume: re-running the same command skips what is done and continues a run
cut off (each `beit` run resumes from its last checkpoint), so the GPU preset can go in several
calls of `timeout 570 python bench/quality/quality.py --preset gpu`. --pretrain-epochs and
--finetune-steps change the budget of every run alike (use a new --work for another budget).
Results: WORK/results.json and a Markdown table on stdout. Independent runs go --jobs at a time,
the cores split between them.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import ROOT, Runner  # noqa: E402

FULL = Path("/usr/share/datasets/fashion-mnist")

ARMS = {  # name -> extra `beit pretrain` arguments
    "beit-v10": "",
    "beit-v4": "--set views=4",
    "beit-v1": "--set views=1",
    "pixels": "--targets pixels",
    "random-mask": "--set mask=random",
    "online": "--targets online",
}

CPU = dict(
    # 2 CPU cores: about 45 minutes. A 4-layer width-128 ViT on 28 px images (7x7 patches of 4).
    image=28,
    images=10_000,  # pre-training images with --source (the shipped subset has 8,000)
    val=10_000,
    model=dict(width=128, depth=4, heads=4),
    tokenizer=dict(steps=400, batch=64, n_hid=32, vocab=512, warmup=50),
    views=10,
    tokenize_batch=64,
    pretrain=dict(epochs=6, batch=64, lr=3e-3, warmup=1),
    arms=ARMS,
    finetune=dict(steps=300, batch=64, lr=2e-3, layer_decay=0.75),
    labels=(0.01, 0.1, 1.0),  # fractions of the pre-training images' count: BEiT and scratch on each
    main=0.1,  # every arm fine-tuned on this fraction
)

PRESETS = {
    "cpu": CPU,
    # one GPU: ViT-S widths on all 60,000 training images. Counted (torch's FLOP counter): 6.56
    # GFLOP per pre-training sample and 6.51 per fine-tuning sample (50 tokens of width 384, 12
    # layers); 6 runs x 30 epochs x 60,000 and 10 x 1,500 steps x 256 make 9.6e16 FLOP, 8 minutes
    # at 20% of an H100's bf16 peak. It fits one session's device time in two 10-minute calls.
    "gpu": {
        **CPU,
        "images": 60_000,
        "model": dict(width=384, depth=12, heads=6),
        "tokenizer": dict(steps=5000, batch=256, n_hid=64, vocab=1024, warmup=50),
        "tokenize_batch": 256,
        "pretrain": dict(epochs=30, batch=256, lr=1.5e-3, warmup=3),
        "finetune": dict(steps=1500, batch=256, lr=2e-3, layer_decay=0.75),
    },
    # BEiT against scratch with 10% of the labels, quickly: 32 px, 4 views, 12 epochs.
    "quick": {
        **CPU,
        "image": 32,
        "images": 8000,
        "tokenizer": dict(steps=600, batch=64, n_hid=32, vocab=512, warmup=50),
        "views": 4,
        "pretrain": dict(epochs=12, batch=64, lr=1.5e-3, warmup=1),
        "arms": {"beit-v4": ""},
        "finetune": dict(steps=375, batch=64, lr=2e-3, layer_decay=0.75),
        "labels": (0.1,),
    },
    # Does V matter once each view repeats many times? 2,000 images, 30 epochs (930 steps, the cpu
    # preset's budget): all 10 cached views (each seen 3 times) against the first only (seen 30
    # times); fine-tuned on the cpu preset's 1,000 labelled images.
    "views": {
        **CPU,
        "images": 2000,
        "pretrain": dict(epochs=30, batch=64, lr=3e-3, warmup=3),
        "arms": {"beit-v10": "", "beit-v1": "--set views=1"},
        "labels": (),
        "main": 0.5,  # of 2,000: the 1,000 labelled images
    },
    # Do the differences grow with longer pre-training? The cpu preset with 4x the epochs for
    # visual tokens, pixel regression and online tokenization (at 24 epochs each cached view
    # repeats 2.4 times; online targets come from a fresh view every time).
    "longer": {
        **CPU,
        "pretrain": dict(epochs=24, batch=64, lr=3e-3, warmup=2),
        "arms": {"beit-v10": "", "pixels": "--targets pixels", "online": "--targets online"},
        "labels": (),
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", "--size", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--reuse", type=Path, help="an earlier run's folder: its data, labels, tokenizer, store")
    parser.add_argument("--source", type=Path, default=FULL if FULL.is_dir() else None)
    parser.add_argument("--jobs", type=int, default=2 if not _cuda() else 1)
    parser.add_argument("--pretrain-epochs", type=int, help="instead of the preset's (every pre-training run)")
    parser.add_argument("--finetune-steps", type=int, help="instead of the preset's (every fine-tuning run)")
    args = parser.parse_args()
    size = copy.deepcopy(PRESETS[args.preset])
    if args.pretrain_epochs:
        size["pretrain"]["epochs"] = args.pretrain_epochs
    if args.finetune_steps:
        size["finetune"]["steps"] = args.finetune_steps
    work = (args.work or ROOT / "runs" / f"quality-{args.preset}").resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    runner = Runner(work, args.jobs, split_every_step=False)
    n_images = min(size["images"], 8000) if not args.source else size["images"]
    n_val = size["val"] if args.source else 2000
    print(f"quality ({args.preset}): {n_images} pre-training images, {n_val} validation images, work {work}")
    shared = args.reuse.resolve() if args.reuse else work
    data, store = prepare_pretraining(runner, size, args.source, work, shared, n_images, n_val)
    fractions = labelled_sets(runner, size, args.source, shared, n_images, n_val)
    arms = size["arms"]
    first = next(iter(arms))
    jobs = [pretrain_job(size, work, store, name, extra) for name, extra in arms.items()]
    jobs += [finetune_job(size, work, f"scratch-{_pct(fr)}", "none", fractions[fr]) for fr in size["labels"]]
    runner.pool([(name, line, True) for name, line in jobs])
    jobs = [finetune_job(size, work, f"{name}-{_pct(size['main'])}", _checkpoint(work, name), fractions[size["main"]])
            for name in arms]  # fmt: skip
    jobs += [
        finetune_job(size, work, f"{first}-{_pct(fr)}", _checkpoint(work, first), fractions[fr])
        for fr in size["labels"]
        if fr != size["main"]
    ]
    runner.pool([(name, line, True) for name, line in jobs])
    report(work, shared, store, args, size, runner.times)


q = shlex.quote


def prepare_pretraining(runner: Runner, size: dict, source, work: Path, shared: Path, n_images: int, n_val: int):
    """(data folder, store) of the pre-training images: the shared folder's when it holds as many
    images as this preset pre-trains on, else this run's own; the tokenizer always the shared one."""
    s = size["image"]
    t = size["tokenizer"]
    tokenizer = shared / "tokenizer.safetensors"
    shared_data = shared / "data"
    if not (shared_data / "train").is_dir():
        line = f"data fashion-mnist {q(str(shared_data))} --size {s} {_source(source)} --train {n_images} --val {n_val}"
        runner.beit("data", line)
    if not tokenizer.is_file():
        runner.beit(
            "tokenizer",
            f"tokenizer train {q(str(shared_data / 'train'))} -o {q(str(tokenizer))} --steps {t['steps']} "
            f"--input-size {s} --vocab-size {t['vocab']} --batch-size {t['batch']} --set model.group_count=3 "
            f"--set model.n_hid={t['n_hid']} --set model.n_init={t['n_hid']} --set warmup_steps={t['warmup']} "
            "--set held_out=0.05 --set min_crop_area=0.5",
        )
    own = sum(1 for _ in (shared_data / "train").rglob("*.png")) != n_images
    data = work / "data" if own else shared_data
    if own and not (data / "train").is_dir():
        line = f"data fashion-mnist {q(str(data))} --size {s} {_source(source)} --train {n_images} --val {n_val}"
        runner.beit("data", line)
    store = (work if own else shared) / "store"
    runner.beit(
        "tokenize",
        f"tokenize {q(str(data / 'train'))} {q(str(store))} --tokenizer {q(str(tokenizer))} --views {size['views']} "
        f"--set view.image_size={s} --set patch_size=4 --set view.scale=[0.5,1.0] "
        f"--batch-size {size['tokenize_batch']} --set chunk_images=500",
    )
    return data, store


def labelled_sets(runner: Runner, size: dict, source, shared: Path, n_images: int, n_val: int) -> dict:
    """{fraction: folder} of class-balanced labelled sets, one per fraction of the pre-training
    images' count (drawn with seed 1, apart from the pre-training images' draw)."""
    fractions = {}
    for fraction in sorted({*size["labels"], size["main"]}):
        count = round(n_images * fraction)
        folder = shared / f"labels-{count}"
        if not (folder / "train").is_dir():
            line = f"data fashion-mnist {q(str(folder))} --size {size['image']} {_source(source)} --train {count} "
            runner.beit(f"labels-{count}", line + f"--val {n_val} --seed 1")
        fractions[fraction] = folder
    return fractions


def _model(size: dict) -> str:
    m = size["model"]
    return (
        f"--model tiny --set model.image_size={size['image']} --set model.patch_size=4 --set model.width={m['width']} "
        f"--set model.heads={m['heads']} --set model.depth={m['depth']}"
    )


def pretrain_job(size: dict, work: Path, store: Path, name: str, extra: str) -> tuple[str, str]:
    p = size["pretrain"]
    return f"pretrain-{name}", (
        f"pretrain {q(str(store))} --out {q(str(work / f'pretrain-{name}'))} {_model(size)} --epochs {p['epochs']} "
        f"--batch-size {p['batch']} --lr {p['lr']} --warmup-epochs {p['warmup']} --set log_every=50 "
        f"--set model.drop_path=0.0 {extra}"
    )


def finetune_job(size: dict, work: Path, name: str, init: str, labels: Path) -> tuple[str, str]:
    f = size["finetune"]
    count = sum(1 for _ in (labels / "train").rglob("*.png"))
    epochs = max(1, round(f["steps"] / max(1, count // f["batch"])))  # the same number of steps for all
    # layer-wise lr decay only where there are pre-trained layers to keep; from scratch it only
    # slows the lower layers down
    decay = 1.0 if init == "none" else f["layer_decay"]
    return name, (
        f"finetune {q(str(labels))} --init {q(init)} --out {q(str(work / name))} {_model(size)} --epochs {epochs} "
        f"--batch-size {f['batch']} --lr {f['lr']} --layer-decay {decay} "
        f"--set warmup_epochs={max(epochs / 10, 0.1):g} --set randaugment=false --set mixup=0 --set cutmix=0 "
        f"--set erasing=0 --set model.drop_path=0.1 --set eval_every={epochs}"
    )


def _checkpoint(work: Path, name: str) -> str:
    return str(work / f"pretrain-{name}" / "checkpoint.pt")


def _source(source) -> str:
    return f"--source {q(str(source))}" if source else ""


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


def report(work: Path, shared: Path, store: Path, args, size: dict, times: dict) -> None:
    def top1(run: str) -> float:
        return [r for r in _rows(work / run / "metrics.jsonl") if "eval_top1" in r][-1]["eval_top1"] * 100

    tokenizer = json.loads((shared / "tokenizer.json").read_text())
    held = tokenizer["report"]["held_out"]
    stage1 = json.loads(store.with_name(store.name + ".metrics.json").read_text())
    arms, main = size["arms"], _pct(size["main"])
    first = next(iter(arms))
    results = {
        "preset": args.preset,
        "source": str(args.source) if args.source else "shipped subset",
        "settings": size,
        "tokenizer": {"psnr": held["psnr"], "codes_used": held["codes_used"], "vocab": tokenizer["vocab_size"]},
        "tokenize_views_per_s": stage1["views_per_s"],
        "pretrain": {},
        "finetune": {},
        "seconds": times,
    }
    for name in arms:
        rows = _rows(work / f"pretrain-{name}" / "metrics.jsonl")
        results["pretrain"][name] = {
            "steps": rows[-1]["step"],
            "loss": rows[-1]["loss"],
            "mim_accuracy": rows[-1].get("mim_accuracy"),
            "images_per_s": sorted(r["images_per_s"] for r in rows)[len(rows) // 2],
        }
    for fr in size["labels"]:
        for name in (f"scratch-{_pct(fr)}", f"{first}-{_pct(fr)}"):
            results["finetune"][name] = top1(name)
    for name in arms:
        results["finetune"][f"{name}-{main}"] = top1(f"{name}-{main}")
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    ft = results["finetune"]
    print(f"\ntokenizer: held-out PSNR {held['psnr']:.1f} dB, {held['codes_used']}/{tokenizer['vocab_size']} codes; "
          f"stage 1: {stage1['views_per_s']:.0f} views/s")  # fmt: skip
    if size["labels"]:
        print(f"\n| labels | BEiT ({first}) | scratch | difference |\n| --- | --- | --- | --- |")
        for fr in size["labels"]:
            b, sc = ft[f"{first}-{_pct(fr)}"], ft[f"scratch-{_pct(fr)}"]
            print(f"| {fr * 100:g}% | {b:.1f} | {sc:.1f} | {b - sc:+.1f} |")
    header = "| top-1 | masked-token acc. | pre-train img/s (median) |"
    print(f"\n| pre-training (then {size['main'] * 100:g}% labels) {header}")
    print("| --- | --- | --- | --- |")
    for name in arms:
        pt = results["pretrain"][name]
        acc = f"{pt['mim_accuracy'] * 100:.1f}%" if pt["mim_accuracy"] is not None else "-"
        print(f"| {name} | {ft[f'{name}-{main}']:.1f} | {acc} | {pt['images_per_s']:.0f} |")
    if f"scratch-{main}" in ft:
        print(f"| scratch | {ft[f'scratch-{main}']:.1f} | - | - |")
    print(f"\nresults in {work / 'results.json'}; jobs {args.jobs} at a time")


if __name__ == "__main__":
    main()
