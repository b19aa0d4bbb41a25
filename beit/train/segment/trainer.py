"""Semantic segmentation: fine-tune a pre-trained BEiT with UperNet (the released recipe), as a
peer of classification fine-tuning on the same run scaffold.

    beit segment train DATA --init runs/pt/checkpoint.pt --out runs/seg            # ADE20K, VOC, Cityscapes, folder
    torchrun --nproc_per_node 8 -m beit segment train DATA --init ... --out runs/seg --batch-size 2
    beit segment evaluate runs/seg/best.pt DATA --mode slide --scales 0.5,0.75,1.0,1.25,1.5,1.75 --flip
    beit segment predict runs/seg/best.pt photo.jpg -o masks/ --overlay

DATA's layout is detected (`beit.train.segment.data`); its training images go through
mmseg's ADE20K pipeline (random resize 0.5-2x of `scale`, a crop with at most 75% of one class,
flip, photometric distortion). The model is `beit.train.segment.model.BeitSegmenter`. The recipe is
the released one for self-supervised checkpoints: AdamW lr 7e-4, weight decay 0.05, layer decay
0.65 (the heads at the top), linear warm-up over 1,500 iterations from 1e-6 x lr then poly
(power 1) to 0, 160k iterations, crop 512, drop path 0.1. From a fine-tuned (classification)
checkpoint the released intermediate-fine-tuning values apply instead, unless set: lr 3e-5,
layer decay 0.9, crop 640; from scratch (`--init none`) no layer decay. BatchNorm in the heads
is synchronised across GPUs under torchrun. Every `eval_every` iterations (and at the end) rank 0
evaluates on val by sliding window (stride 2/3 of the crop) and keeps best.pt by mIoU;
checkpoint.pt is the latest, and running the same command again resumes from it. An image that
cannot be read is skipped and written with its reason to skipped.jsonl; a run stops when more
than `max_skipped_fraction` of those tried are unreadable.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

from beit.shared.checkpoint import adapt_state_dict, load_weights, read_state_dict
from beit.shared.config import to_dict
from beit.shared.dist import DEFAULT_TIMEOUT_MINUTES
from beit.shared.inputs import MAX_SKIPPED_FRACTION, SkippedLog
from beit.train.model import ARCHITECTURE, ModelConfig
from beit.train.scaffold import RUN_SETTINGS, LossMeter, Run, StepEnd, layer_decay_groups, set_lr
from beit.train.segment.data import SegmentationData, segmentation_inputs
from beit.train.segment.datasets import read_segmentation
from beit.train.segment.inference import evaluate_segmenter
from beit.train.segment.model import BeitSegmenter, segmentation_loss
from beit.train.segment.predict import comparison_rows

# The released values for a self-supervised checkpoint and for one fine-tuned on labels first
# (pt2ft); from scratch the same, but without layer decay (nothing in the lower layers to keep).
RECIPES = {
    "pretrained": {"lr": 7e-4, "layer_decay": 0.65, "crop": 512},
    "finetuned": {"lr": 3e-5, "layer_decay": 0.9, "crop": 640},
    "scratch": {"lr": 7e-4, "layer_decay": 1.0, "crop": 512},
}


@dataclass
class SegmentConfig:
    # model settings an --init checkpoint fixes unless set (the crop, model.image_size, stays the task's)
    ARCHITECTURE_FROM_INIT: ClassVar[tuple[str, ...]] = ARCHITECTURE
    # keys a resumed run may change (they do not change what it computes)
    FREE_ON_RESUME: ClassVar[tuple[str, ...]] = (*RUN_SETTINGS, "eval_every")
    # the lowest value of each key listed (load_config checks them)
    MINIMUM: ClassVar[dict[str, int]] = {
        **dict.fromkeys(("iters", "batch_size", "log_every", "checkpoint_every", "eval_every"), 1),
        "threads": 0,
    }

    # image_size 0: the recipe's crop (512, or 640 from a fine-tuned checkpoint); num_classes 0: the data's
    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="base", image_size=0, num_classes=0))
    init: str = "none"  # a checkpoint (this project's pre-trained or fine-tuned, unilm, timm) or "none"
    format: str = ""  # ade20k | voc | cityscapes | folder; "": detected
    num_classes: int = 0  # folder layout: the classes (else classes.json)
    reduce_zero_label: bool = False  # folder layout: label 0 is "other" (ignored), k -> k - 1
    ignore_index: int = 255
    head: Literal["upernet", "linear"] = "upernet"
    channels: int = 0  # UperNet's channels; 0: the model's width (768 for ViT-B, as released)
    aux_channels: int = 256
    iters: int = 160_000
    batch_size: int = 16  # per rank (released: 2 per GPU on 8 GPUs)
    lr: float = 0.0  # 0: the recipe's (7e-4, or 3e-5 from a fine-tuned checkpoint)
    layer_decay: float = 0.0  # 0: the recipe's (0.65, or 0.9 from a fine-tuned checkpoint)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iters: int = -1  # -1: the released share of the run (1,500 of 160,000 iterations), at least 1
    warmup_ratio: float = 1e-6
    power: float = 1.0
    min_lr: float = 0.0
    # the base scale images are resized to (long, short side at most); (0, 0): 4 x the crop by the
    # crop, as released ((2048, 512) at crop 512, (2560, 640) at 640), so small images stay small
    scale: tuple[int, int] = (0, 0)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    eval_every: int = 16_000
    eval_mode: Literal["slide", "whole"] = "slide"
    stride: int = 0  # sliding window stride; 0: 2/3 of the crop (341 at 512, as released)
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    threads: int = 0  # DALI's CPU threads per rank; 0: the machine's cores shared among its local ranks
    device: str = "auto"
    dist_timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES  # torchrun: how long ranks wait while rank 0 evaluates
    stop_signal: str = "SIGUSR1"  # stops the run cleanly, as SIGTERM does (SLURM --signal); none: SIGTERM only
    tensorboard: bool = False  # also write TensorBoard event files into the run folder's tensorboard/
    # stop when more of the images tried than this share cannot be read (once 10 are): a wrong path or mount
    max_skipped_fraction: float = MAX_SKIPPED_FRACTION


def poly_lr_at(step: int, base: float, total: int, warmup: int, warmup_ratio: float, power: float, minimum: float):
    """mmcv's poly schedule with linear warm-up: (base - minimum) (1 - step / total)^power + minimum,
    scaled over the first `warmup` steps from `warmup_ratio` of it up to all of it."""
    regular = (base - minimum) * (1 - min(step, total) / total) ** power + minimum
    if step >= warmup:
        return regular
    return regular * (1 - (1 - step / warmup) * (1 - warmup_ratio))


def recipe_of(state: dict | None) -> str:
    """The recipe for an init checkpoint's weights: "finetuned" for a fine-tuned (classification)
    one, "scratch" for none, else "pretrained"."""
    if state is None:
        return "scratch"
    return "finetuned" if "head.weight" in state and "lm_head.weight" not in state else "pretrained"


def resolve(cfg: SegmentConfig, classes: int, init: dict | None) -> tuple[ModelConfig, float, float, str]:
    """(the model's config, lr, layer decay, recipe): the recipe of the `init` weights fills what
    the config leaves 0."""
    recipe = recipe_of(init)
    values = RECIPES[recipe]
    model = ModelConfig(**{**to_dict(cfg.model), "num_classes": cfg.model.num_classes or classes})
    model.image_size = model.image_size or values["crop"]
    if model.num_classes != classes:
        raise ValueError(f"model.num_classes {model.num_classes} does not match the data's {classes} classes.")
    return model.resolved(), cfg.lr or values["lr"], cfg.layer_decay or values["layer_decay"], recipe


def crop_for_the_images(model_cfg: ModelConfig, sizes: list[tuple[int, int]]) -> tuple[ModelConfig, str]:
    """The recipe's crop, unless every training image is smaller (on its shorter side): then the
    largest multiple of 32 (the neck's coarsest stride) that the largest of them holds, so small
    images are not blown up to the released 512 or 640. Returns the config and where its crop came from."""
    recipe_crop = model_cfg.image_size
    largest = max((min(size) for size in sizes), default=recipe_crop)
    if largest >= recipe_crop or largest < 32:
        return model_cfg, f"the recipe's crop ({recipe_crop})"
    crop = largest // 32 * 32
    resized = ModelConfig(**{**model_cfg.__dict__, "image_size": crop}).resolved()
    return (
        resized,
        f"the images: none is {recipe_crop} px on its shorter side (the largest {largest}), so a multiple "
        "of 32 they hold",
    )


RELEASED_WARMUP = (1500, 160_000)  # warm-up iterations of the released run's iterations


def follow_the_run(cfg: SegmentConfig, crop: int) -> dict[str, str]:
    """Fill the settings left to follow the crop and the run's length (scale, warm-up) in `cfg`,
    and refuse in one sentence what cannot do what was asked; returns where each filled value came from."""
    origins = {}
    if tuple(cfg.scale) == (0, 0):
        cfg.scale = (4 * crop, crop)
        origins["scale"] = f"4 x the crop by the crop {crop} (the released 2048 x 512 at 512)"
    elif min(cfg.scale) * cfg.ratio_range[1] < crop:
        raise ValueError(
            f"scale {list(cfg.scale)} resizes images to at most {round(min(cfg.scale) * cfg.ratio_range[1])} px on "
            f"the shorter side (ratio_range up to {cfg.ratio_range[1]}), less than the crop {crop}: every crop "
            "would be mostly padding; raise scale, or leave it [0, 0] to follow the crop."
        )
    if cfg.warmup_iters < 0:
        cfg.warmup_iters = max(1, round(cfg.iters * RELEASED_WARMUP[0] / RELEASED_WARMUP[1]))
        origins["warmup_iters"] = f"the released share of the run's {cfg.iters} iterations (1,500 of 160,000)"
    elif cfg.warmup_iters > cfg.iters:
        raise ValueError(
            f"warmup_iters {cfg.warmup_iters} is longer than the run (iters {cfg.iters}): the learning rate would "
            "never leave warm-up; lower it, or leave it -1 for the released share of the run."
        )
    return origins


def settle(cfg: SegmentConfig, run: Run, init: dict | None, train_source) -> tuple[ModelConfig, float, float, str]:
    """`resolve`'s (model config, lr, layer decay, recipe), with what the config leaves to the
    data and the run filled in `cfg` (the crop, the scale, the warm-up) and their origins noted
    for config.toml."""
    crop_unset = not cfg.model.image_size
    model_cfg, lr, layer_decay, recipe = resolve(cfg, train_source.num_classes, init)
    if crop_unset:
        model_cfg, origin = crop_for_the_images(model_cfg, train_source.sizes)
        cfg.model.image_size = model_cfg.image_size  # recorded in config.toml as the value used
        run.origins["model.image_size"] = origin
    run.origins.update(follow_the_run(cfg, model_cfg.image_size))
    return model_cfg, lr, layer_decay, recipe


def build_segmenter(model_cfg: ModelConfig, cfg: SegmentConfig, init: dict | None) -> tuple[BeitSegmenter, list[str]]:
    """The segmenter (initialised from `cfg.seed`), with the `init` weights adapted and loaded;
    the notes on what was adapted."""
    torch.manual_seed(cfg.seed)
    model = BeitSegmenter(model_cfg, cfg.head, cfg.channels, cfg.aux_channels)
    notes = []
    if init is not None:
        init, notes = adapt_state_dict(init, model)
        load_weights(model, init, source=cfg.init)
    return model, notes


def build_data(train_source, val_source, crop: int, cfg: SegmentConfig, run: Run, log: SkippedLog) -> tuple:
    """This rank's share of the training images (augmented crops) and the validation images, each
    counting what it read and skipped (the skipped into `log`)."""
    shared = dict(seed=cfg.seed, scale=cfg.scale, threads=cfg.threads, device_id=run.device_id)
    augment = dict(
        ratio_range=cfg.ratio_range, cat_max_ratio=cfg.cat_max_ratio, rank=run.dist.rank, world=run.dist.world
    )
    inputs = {split: segmentation_inputs(source, cfg.max_skipped_fraction, log, split)
              for split, source in (("train", train_source), ("val", val_source))}  # fmt: skip
    run.watch_inputs(inputs["train"])  # under torchrun, a share of unreadable images stops every rank together
    train = SegmentationData(train_source, crop, cfg.batch_size, True, **shared, **augment, inputs=inputs["train"])
    return train, SegmentationData(val_source, crop, 1, False, **shared, inputs=inputs["val"])


def segment(data_dir: Path, out: Path, cfg: SegmentConfig, resume: bool = True, progress: bool = True) -> dict:
    run = Run(out, cfg, "segment", progress)
    dist, device = run.dist, run.device
    read = dict(format=cfg.format or None, num_classes=cfg.num_classes, ignore_index=cfg.ignore_index)
    read["reduce_zero_label"] = cfg.reduce_zero_label if cfg.format == "folder" else None
    train_source = read_segmentation(data_dir, "train", **read)
    val_source = read_segmentation(data_dir, "val", **read)
    for source, split in ((train_source, "train"), (val_source, "val")):
        dist.check_same(f"the {split} images of {data_dir}", [str(k) for k in source.keys])
    init = None if cfg.init == "none" else read_state_dict(Path(cfg.init))  # read once: the recipe and the weights
    model_cfg, lr, layer_decay, recipe = settle(cfg, run, init, train_source)
    model, notes = build_segmenter(model_cfg, cfg, init)
    model.to(device)
    crop, stride = model_cfg.image_size, cfg.stride or round(model_cfg.image_size * 2 / 3)
    train, val = build_data(train_source, val_source, crop, cfg, run, run.skipped_log(resume))
    groups = layer_decay_groups(model, lr, cfg.weight_decay, layer_decay)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, fused=device.type == "cuda")
    run.identity(classes=train_source.class_names, recipe=recipe)
    torch.manual_seed(cfg.seed + dist.rank)  # one weight init everywhere, drop path per rank
    step, best, result = 0, -1.0, {}
    meta = run.resume(resume, model, optimizer, cfg.iters)
    if meta:
        step, best, result = meta["step"], meta["best_miou"], meta.get("last_eval", {})
    run.start(step)
    if dist.world > 1 and device.type == "cuda":  # SyncBatchNorm needs GPUs; on CPUs each rank keeps its own statistics
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    trained = run.wrap(model)
    stream = train.stream(step)
    bar = run.bar(cfg.iters, step)
    ending = StepEnd(run, LossMeter(device, step), optimizer, bar, cfg.iters, cfg.log_every, "mIoU",
                     ("mIoU", "mAcc", "aAcc", "images", "skipped"), best, result)  # fmt: skip

    def save(path: Path, rng: list[dict]) -> None:
        meta = {
            "step": step,
            "best_miou": ending.best,
            "last_eval": {k: ending.last[k] for k in ("mIoU", "mAcc", "aAcc") if k in ending.last},
            "model": to_dict(model_cfg),
            "head": cfg.head,
            "channels": cfg.channels,
            "aux_channels": cfg.aux_channels,
            "out_indices": list(model.out_indices),
            "class_names": train_source.class_names,
            "ignore_index": cfg.ignore_index,
            "scale": list(cfg.scale),
            "stride": stride,
            "init": cfg.init,
            "data": {k: read[k] for k in ("num_classes", "ignore_index")}
            | {"format": train_source.format, "reduce_zero_label": train_source.reduce_zero_label},
            "effective_lr": lr,
            "layer_decay": layer_decay,
        }
        run.save(path, model, optimizer, rng, meta)

    def evaluate(step: int) -> dict:
        """The validation metrics; with TensorBoard, also a picture of predictions beside ground truth."""
        result = evaluate_segmenter(model, val, cfg.eval_mode, stride, keep=4 if run.board is not None else 0)
        if result.get("examples"):
            rows = comparison_rows(result.pop("examples"), model.cfg.num_classes, cfg.ignore_index, height=96)
            run.picture("predictions (image, ground truth, prediction)", rows, step)
        return result

    while step < cfg.iters:
        set_lr(optimizer, poly_lr_at(step, lr, cfg.iters, cfg.warmup_iters, cfg.warmup_ratio, cfg.power, cfg.min_lr))
        pixels, labels = next(stream)
        run.check_inputs()
        pixels, labels = pixels.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with run.autocast():
            loss, _ = segmentation_loss(trained, pixels, labels, cfg.ignore_index)
        ending.update(loss, len(labels))
        step += 1
        ending.log(step)
        evaluating = step % cfg.eval_every == 0 or step == cfg.iters
        saving = evaluating or step % cfg.checkpoint_every == 0
        ending.checkpoint(step, evaluating, saving, functools.partial(evaluate, step), save)
    bar.close()
    run.close()
    best, last = ending.best, ending.last
    counts = {"train": train.inputs.summary(), "val": val.inputs.summary()}
    return {
        "steps": step, "best_miou": best, "last": last, "notes": notes, "recipe": recipe, "lr": lr,
        "inputs": counts, "basis": val.inputs.basis(),
    }  # fmt: skip
