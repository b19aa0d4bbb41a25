"""Fine-tune a pre-trained BEiT for classification (the released recipe).

    beit finetune DATA --init runs/pt/checkpoint.pt --out runs/ft --model base --epochs 100
    beit finetune DATA --init beit_base_patch16_224_pt22k.pth --out runs/ft      # official unilm weights
    beit finetune DATA --init none --out runs/scratch                              # the baseline
    beit evaluate runs/ft/best.pt DATA/val --per-class

DATA is a folder with ImageFolder trees train/ and val/, or a labelled token store (`held_out`
of each class as val); its views come from `beit.train.classify.data` (RandomResizedCrop, flip,
RandAugment in DALI; evaluation: resize to size / 0.875, centre crop), then, in torch: random
erasing, mixup / cutmix with label smoothing (soft-target cross-entropy). After each
`eval_every` epochs, `beit.train.classify.evaluate.evaluate` on val. AdamW with
layer-wise lr decay (the released layer ids: patch embed and cls 0, block i -> i + 1, the rest
depth + 1; scale = decay ^ (depth + 1 - id)), warm-up + cosine, drop path, bf16 on a GPU.
RUN_DIR: config.toml, metrics.jsonl (train rows and eval rows), checkpoint.pt (the latest: every
`checkpoint_every` steps, after each evaluation and at the end; the same command resumes from it,
in the same image order), best.pt (best top-1) and skipped.jsonl (the images that could not be
read, and why: a run stops when more than `max_skipped_fraction` of those tried are unreadable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from beit.shared.checkpoint import load_pretrained
from beit.shared.config import to_dict
from beit.shared.dist import DEFAULT_TIMEOUT_MINUTES
from beit.shared.inputs import MAX_SKIPPED_FRACTION, SkippedLog
from beit.train.classify.data import ClassificationData, classify_inputs, read_splits
from beit.train.classify.evaluate import evaluate_classifier
from beit.train.model import ARCHITECTURE, BeitClassifier, ModelConfig
from beit.train.scaffold import (
    RUN_SETTINGS,
    LossMeter,
    Run,
    StepEnd,
    layer_decay_groups,
    lr_at,
    set_lr,
    warmup_epochs_of,
)


@dataclass
class FinetuneConfig:
    # model settings an --init checkpoint fixes unless set
    ARCHITECTURE_FROM_INIT: ClassVar[tuple[str, ...]] = ("image_size", *ARCHITECTURE)
    # keys a resumed run may change (they do not change what it computes)
    FREE_ON_RESUME: ClassVar[tuple[str, ...]] = (*RUN_SETTINGS, "eval_every", "source_root")
    # the lowest value of each key listed (load_config checks them)
    MINIMUM: ClassVar[dict[str, int]] = {
        **dict.fromkeys(("epochs", "batch_size", "log_every", "checkpoint_every", "eval_every"), 1),
        "threads": 0,
    }

    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="base", num_classes=0))
    init: str = "none"  # a checkpoint (this project's, unilm .pth, timm state dict) or "none"
    epochs: int = 100
    batch_size: int = 64  # per rank
    lr: float | None = None  # effective; none: blr x effective batch / 1024
    blr: float = 4e-3
    min_lr: float = 1e-6
    layer_decay: float = 0.65
    warmup_epochs: float = -1.0  # -1: the released share of the run (20 of 100 epochs)
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    randaugment: bool = True
    erasing: float = 0.25
    held_out: float = 0.1  # the val share of a token store's images (DATA = a store)
    source_root: str = ""  # DATA = a store: its source files under another folder ("": where they were tokenized)
    seed: int = 0
    eval_every: int = 1  # epochs
    checkpoint_every: int = 1000  # steps; also after every evaluation and at the end
    log_every: int = 20
    threads: int = 0  # DALI's CPU threads per rank; 0: the machine's cores shared among its local ranks
    device: str = "auto"
    dist_timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES  # torchrun: how long ranks wait while rank 0 works alone
    stop_signal: str = "SIGUSR1"  # stops the run cleanly, as SIGTERM does (SLURM --signal); none: SIGTERM only
    tensorboard: bool = False  # also write TensorBoard event files into the run folder's tensorboard/
    # stop when more of the images tried than this share cannot be read (once 10 are): a wrong path or mount
    max_skipped_fraction: float = MAX_SKIPPED_FRACTION


# ---------------------------------------------------------------- recipe pieces


def mixup_cutmix(
    pixels: torch.Tensor, labels: torch.Tensor, classes: int, cfg: FinetuneConfig, generator: np.random.Generator
):
    """Mixup or cutmix (chosen with equal odds when both are on) with label smoothing:
    (mixed pixels, soft targets [B, classes]); labels on the pixels' device."""
    off = cfg.label_smoothing / classes
    targets = torch.full((len(labels), classes), off, device=pixels.device)
    targets.scatter_(1, labels.view(-1, 1), 1.0 - cfg.label_smoothing + off)
    use_cutmix = cfg.cutmix > 0 and (cfg.mixup <= 0 or generator.random() < 0.5)
    alpha = cfg.cutmix if use_cutmix else cfg.mixup
    if alpha <= 0:
        return pixels, targets
    lam = float(generator.beta(alpha, alpha))
    flipped = pixels.flip(0)
    if use_cutmix:
        h, w = pixels.shape[2:]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(generator.integers(h)), int(generator.integers(w))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        pixels = pixels.clone()
        pixels[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        pixels = pixels * lam + flipped * (1 - lam)
    return pixels, targets * lam + targets.flip(0) * (1 - lam)


def random_erasing(pixels: torch.Tensor, probability: float, generator: np.random.Generator) -> torch.Tensor:
    """Erase one random rectangle (area 2-33%, log-uniform aspect 0.3-3.3) per sample with
    `probability`, filled with normal noise (timm's mode 'pixel')."""
    if probability <= 0:
        return pixels
    pixels = pixels.clone()
    _, _, h, w = pixels.shape
    for i in range(len(pixels)):
        if generator.random() >= probability:
            continue
        for _ in range(10):
            area = h * w * generator.uniform(0.02, 1 / 3)
            aspect = math.exp(generator.uniform(math.log(0.3), math.log(1 / 0.3)))
            eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if eh < h and ew < w:
                y, x = int(generator.integers(0, h - eh + 1)), int(generator.integers(0, w - ew + 1))
                pixels[i, :, y : y + eh, x : x + ew] = torch.randn(3, eh, ew, device=pixels.device)
                break
    return pixels


def build_model(cfg: FinetuneConfig, classes: int, data_dir: Path) -> tuple[BeitClassifier, list[str]]:
    """The classifier for `classes` classes, initialised from `cfg.init` (with seed `cfg.seed`);
    also returns what loading the pre-trained weights noted."""
    model_cfg = ModelConfig(**{**to_dict(cfg.model), "num_classes": cfg.model.num_classes or classes}).resolved()
    if model_cfg.num_classes != classes:
        raise ValueError(
            f"model.num_classes {model_cfg.num_classes} does not match the {classes} classes of {data_dir}/train."
        )
    torch.manual_seed(cfg.seed)
    model = BeitClassifier(model_cfg)
    notes = [] if cfg.init == "none" else load_pretrained(model, Path(cfg.init))
    return model, notes


# ---------------------------------------------------------------- the loop


def check_same_splits(dist, data_dir, train_source, val_source) -> None:
    """Every rank lists the same train and val images (else ranks would mix up images and labels)."""
    for source, split in ((train_source, "train"), (val_source, "val")):
        dist.check_same_listing(f"the {split} images of {data_dir}", source.fingerprint(), source.entries)


def build_data(train_source, val_source, size: int, cfg: FinetuneConfig, run: Run, log: SkippedLog) -> tuple:
    """This rank's share of the training images (augmented) and the validation images, each
    counting what it read and skipped (the skipped into `log`)."""
    views = {"seed": cfg.seed, "randaugment": cfg.randaugment, "threads": cfg.threads, "device_id": run.device_id}
    world = {"rank": run.dist.rank, "world": run.dist.world}
    inputs = {split: classify_inputs(source, split, cfg.max_skipped_fraction, log)
              for split, source in (("train", train_source), ("val", val_source))}  # fmt: skip
    run.watch_inputs(inputs["train"])  # under torchrun, a share of unreadable images stops every rank together
    train = ClassificationData(train_source, size, cfg.batch_size, True, **world, **views, inputs=inputs["train"])
    return train, ClassificationData(val_source, size, cfg.batch_size, False, **views, inputs=inputs["val"])


def resumed(meta: dict | None) -> tuple[int, float, dict]:
    """(step, best top-1, last evaluation) from a resumed checkpoint's meta; a fresh run's without."""
    if not meta:
        return 0, -1.0, {}
    result = meta.get("last_eval", {})
    if not result and meta.get("top1", -1.0) >= 0:  # a checkpoint from before last_eval
        result = {"top1": meta["top1"]}
    return meta["step"], meta["best_top1"], result


def finetune(data_dir: Path | str, out: Path, cfg: FinetuneConfig, resume: bool = True, progress: bool = True) -> dict:
    run = Run(out, cfg, "finetune", progress)
    run.origins.update(warmup_epochs_of(cfg, (20, 100)))  # before the run's identity records the config
    dist, device = run.dist, run.device
    train_source, val_source = read_splits(data_dir, cfg.held_out, cfg.seed, cfg.source_root)
    check_same_splits(dist, data_dir, train_source, val_source)
    classes = len(train_source.class_names)
    model, notes = build_model(cfg, classes, data_dir)
    model_cfg = model.cfg
    model.to(device)
    train, val = build_data(train_source, val_source, model_cfg.image_size, cfg, run, run.skipped_log(resume))
    effective_batch = cfg.batch_size * dist.world
    lr = cfg.lr if cfg.lr is not None else cfg.blr * effective_batch / 1024
    total = cfg.epochs * train.steps_per_epoch
    warmup = round(cfg.warmup_epochs * train.steps_per_epoch)
    groups = layer_decay_groups(model, lr, cfg.weight_decay, cfg.layer_decay)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups], lr=lr, fused=device.type == "cuda"
    )
    run.identity(classes=train_source.class_names)
    torch.manual_seed(cfg.seed + dist.rank)  # one weight init everywhere, drop path and erasing per rank
    step, best, result = resumed(run.resume(resume, model, optimizer, total))
    run.start(step)
    trained = run.wrap(model)
    stream = train.stream(step)
    bar = run.bar(total, step)
    metrics = ("top1", "top5", "loss", "images", "skipped")
    ending = StepEnd(run, LossMeter(device, step), optimizer, bar, total, cfg.log_every, "top1", metrics, best, result)

    def save(path: Path, rng: list[dict]) -> None:
        meta = {
            "step": step,
            "epoch": step / train.steps_per_epoch,
            "best_top1": ending.best,
            "top1": ending.last.get("top1", -1.0),
            "last_eval": {k: ending.last[k] for k in ("top1", "top5", "loss") if k in ending.last},
            "model": to_dict(model_cfg),
            "init": cfg.init,
            "effective_lr": lr,
            "class_names": train_source.class_names,
        }
        run.save(path, model, optimizer, rng, meta)

    while step < total:
        set_lr(optimizer, lr_at(step, lr, cfg.min_lr, warmup, total))
        pixels, labels = next(stream)
        run.check_inputs()
        labels = labels.to(device, non_blocking=True)  # a blocking copy would wait for the GPU
        generator = np.random.default_rng([cfg.seed, dist.rank, step])
        pixels = pixels.to(device, non_blocking=True)
        pixels = random_erasing(pixels, cfg.erasing, generator)
        pixels, targets = mixup_cutmix(pixels, labels, classes, cfg, generator)
        with run.autocast():
            logits = trained(pixels)
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        ending.update(loss, len(labels))
        step += 1
        ending.log(step, epoch=step / train.steps_per_epoch)
        end_of_epoch = step % train.steps_per_epoch == 0
        evaluating = end_of_epoch and ((step // train.steps_per_epoch) % cfg.eval_every == 0 or step == total)
        saving = evaluating or step % cfg.checkpoint_every == 0 or step == total
        ending.checkpoint(
            step, evaluating, saving, lambda: evaluate_classifier(model, val, device, classes), save,
            epoch=step / train.steps_per_epoch,
        )  # fmt: skip
    bar.close()
    run.close()
    return {
        "steps": step,
        "best_top1": ending.best,
        "last": ending.last,
        "notes": notes,
        "effective_lr": lr,
        "checkpoint": str(run.checkpoint),
        "inputs": {"train": train.inputs.summary(), "val": val.inputs.summary()},
        "basis": val.inputs.basis(),
    }
