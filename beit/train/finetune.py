"""Fine-tune a pre-trained BEiT for classification (the released recipe), and evaluate it.

    beit finetune DATA --init runs/pt/checkpoint.pt --out runs/ft --model base --epochs 100
    beit finetune DATA --init beit_base_patch16_224_pt22k.pth --out runs/ft      # official unilm weights
    beit finetune DATA --init none --out runs/scratch                              # the baseline
    beit evaluate runs/ft/best.pt DATA/val --per-class

DATA is a folder with ImageFolder trees train/ and val/ (the same class sub-folders), or a
token store made from labelled images (its images and labels, `held_out` of each class as
val), so a tokenized data set is fine-tuned without re-reading its source listing. Training
views: RandomResizedCrop to the model's size (bicubic), flip, RandAugment (n 2, m 9; DALI),
normalised; then in torch: random erasing, mixup / cutmix with label smoothing (soft-target
cross-entropy). Evaluation: resize the shorter side to size / 0.875, centre crop. AdamW with
layer-wise lr decay (the released layer ids: patch embed and cls 0, block i -> i + 1, the rest
depth + 1; scale = decay ^ (depth + 1 - id)), warm-up + cosine, drop path, bf16 on a GPU.
RUN_DIR: config.toml, metrics.jsonl (train rows and eval rows), checkpoint.pt (the latest: every
`checkpoint_every` steps, after each evaluation and at the end; the same command resumes from it,
in the same image order) and best.pt (best top-1).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from beit.shared.checkpoint import load_checkpoint, load_pretrained, save_checkpoint
from beit.shared.config import resume_fields, to_dict, to_toml
from beit.shared.counter import counter_key
from beit.shared.decode import ImageBatches
from beit.shared.dist import DEFAULT_TIMEOUT_MINUTES, init_dist
from beit.shared.images import Source, read_source
from beit.shared.model import BeitClassifier, ModelConfig
from beit.shared.progress import progress_bar
from beit.shared.views import IMAGENET_MEAN, IMAGENET_STD
from beit.train.data import prefetch
from beit.train.pretrain import lr_at, truncate_metrics


@dataclass
class FinetuneConfig:
    # keys that must be at least 1 (load_config checks them)
    # keys a resumed run may change (they do not change what it computes)
    FREE_ON_RESUME: ClassVar[tuple[str, ...]] = (
        "log_every",
        "checkpoint_every",
        "eval_every",
        "threads",
        "device",
        "dist_timeout_minutes",
    )
    MINIMUM: ClassVar[dict[str, int]] = dict.fromkeys(
        ("epochs", "batch_size", "log_every", "checkpoint_every", "eval_every", "threads"), 1
    )

    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="base", num_classes=0))
    init: str = "none"  # a checkpoint (this project's, unilm .pth, timm state dict) or "none"
    epochs: int = 100
    batch_size: int = 64  # per rank
    lr: float | None = None  # effective; none: blr x effective batch / 1024
    blr: float = 4e-3
    min_lr: float = 1e-6
    layer_decay: float = 0.65
    warmup_epochs: float = 20.0
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    randaugment: bool = True
    erasing: float = 0.25
    held_out: float = 0.1  # the val share of a token store's images (DATA = a store)
    seed: int = 0
    eval_every: int = 1  # epochs
    checkpoint_every: int = 1000  # steps; also after every evaluation and at the end
    log_every: int = 20
    threads: int = 2
    device: str = "auto"
    dist_timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES  # torchrun: how long ranks wait while rank 0 works alone


# ---------------------------------------------------------------- data


def read_store_splits(location: str, held_out: float, seed: int) -> tuple[Source, Source]:
    """A token store's tokenized images and labels, split into train and a held-out val share
    (per class, seeded), so a tokenized data set is fine-tuned without listing its source again.
    Images come from the original files when they are still there, else from the store's copies."""
    from beit.shared.store import DONE, TokenStore

    store = TokenStore.open(location)
    labels = store.group["labels"][:]
    done = np.flatnonzero((store.status() == DONE) & (labels >= 0))
    names = list(store.attrs.get("class_names") or [])
    if not len(done) or not names:
        raise ValueError(
            f"{location} has no labelled images: tokenize an ImageFolder tree (or a labelled list) "
            "to fine-tune from it."
        )
    root = Path(store.attrs.get("source_root", "."))
    keys = store.group["keys"][:]
    files: list = [root / str(k) for k in keys]
    if not all(files[i].exists() for i in done[:16]):
        if "images" not in store.group:
            raise ValueError(
                f"{location}'s source files are gone and it holds no copies: tokenize with --embed-images."
            )
        images = store.group["images"][:]
        files = [bytes(images[i]) for i in range(len(images))]
    rng = np.random.default_rng([seed, 7])
    val_mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels[done]):
        members = done[labels[done] == label]
        count = max(1, round(len(members) * held_out)) if len(members) > 1 else 0
        val_mask[rng.choice(members, size=count, replace=False)] = True
    splits = []
    for chosen in (done[~val_mask[done]], done[val_mask[done]]):
        splits.append(
            Source(
                "store",
                root,
                [files[i] for i in chosen],
                [str(keys[i]) for i in chosen],
                [int(labels[i]) for i in chosen],
                names,
            )
        )
    return splits[0], splits[1]


def read_splits(data: Path, held_out: float = 0.1, seed: int = 0) -> tuple[Source, Source]:
    """DATA/train and DATA/val as ImageFolder trees with the same classes, checked; or, when
    DATA is a token store, its labelled images with a held-out share as val."""
    if (Path(data) / "zarr.json").is_file() or str(data).startswith(("s3://", "gs://", "gcs://", "file://")):
        return read_store_splits(str(data), held_out, seed)
    data = Path(data)
    if not data.is_dir():
        raise ValueError(f"{data} does not exist: pass a folder with train/ and val/ ImageFolder trees.")
    splits = []
    for name in ("train", "val"):
        folder = data / name
        if not folder.is_dir():
            raise ValueError(
                f"{data} has no {name}/ folder: fine-tuning data is DATA/train/<class>/... and DATA/val/<class>/..."
            )
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if not any(f.is_file() for f in sub.rglob("*")):
                raise ValueError(f"class folder {sub} is empty: add its images or remove it.")
        source = read_source(folder)
        if source.kind != "imagefolder":
            raise ValueError(f"{folder} is not an ImageFolder tree: put each image in a class sub-folder.")
        splits.append(source)
    train, val = splits
    extra = sorted(set(val.class_names) - set(train.class_names))
    if extra:
        raise ValueError(
            f"{data}/val has classes that train/ lacks ({', '.join(extra[:5])}): fine-tune on every class you evaluate."
        )
    if val.class_names != train.class_names:  # val may lack some classes: use train's indices
        index = {name: i for i, name in enumerate(train.class_names)}
        val.labels = [index[val.class_names[label]] for label in val.labels]
        val.class_names = train.class_names
    return train, val


def classification_builder(size: int, train: bool, randaugment: bool, threads: int):
    from nvidia.dali import fn, pipeline_def, types

    def build(batch_size: int, device_id: int | None, seed: int):
        @pipeline_def(
            batch_size=batch_size,
            num_threads=threads,
            device_id=device_id,
            seed=seed,
            exec_dynamic=True,
            prefetch_queue_depth=1,
            enable_conditionals=train and randaugment,
        )
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(
                encoded, device="mixed" if device_id is not None else "cpu", output_type=types.RGB
            )
            if train:
                images = fn.random_resized_crop(
                    images, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True
                )
                images = fn.flip(images, horizontal=fn.random.coin_flip())
                if randaugment:
                    import warnings

                    from nvidia.dali.auto_aug import rand_augment

                    with warnings.catch_warnings():  # DALI's own RandAugment calls its deprecated aliases
                        warnings.simplefilter("ignore", DeprecationWarning)
                        images = rand_augment.rand_augment(images, n=2, m=9)
                crop = None
            else:
                images = fn.resize(
                    images, resize_shorter=round(size / 0.875), interp_type=types.INTERP_CUBIC, antialias=True
                )
                crop = [size, size]
            return fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT,
                output_layout="CHW",
                crop=crop,
                mean=[255 * m for m in IMAGENET_MEAN],
                std=[255 * s for s in IMAGENET_STD],
            )

        return pipeline()

    return build


class ClassificationData:
    """Batches of (pixels, labels) in a deterministic per-epoch order, sharded by rank."""

    def __init__(
        self,
        source: Source,
        size: int,
        batch_size: int,
        train: bool,
        cfg: FinetuneConfig,
        rank: int = 0,
        world: int = 1,
        device_id: int | None = None,
    ):
        self.source, self.batch_size, self.train = source, batch_size, train
        self.seed, self.rank, self.world = cfg.seed, rank, world
        self.batches = ImageBatches(
            classification_builder(size, train, cfg.randaugment, cfg.threads), batch_size, device_id, cfg.seed + rank
        )
        n = len(source.files)
        self._order: tuple[int, np.ndarray] = (-1, np.arange(n))
        self.steps_per_epoch = n // (batch_size * world) if train else math.ceil(n / (batch_size * world))
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{source.root} has {n} images, fewer than one batch of {batch_size} x {world}: lower --batch-size."
            )

    def indices(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.steps_per_epoch)
        if self.train and self._order[0] != epoch:  # drawn once per epoch, not per batch; val keeps its order
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.source.files)))
        order = self._order[1]
        start = within * self.batch_size * self.world + self.rank * self.batch_size
        return order[start : start + self.batch_size]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = self.indices(step)
        if not len(chosen):
            return torch.zeros(0, 3, 1, 1), torch.zeros(0, dtype=torch.long)
        outputs, kept = self.batches.run([self.source.files[i] for i in chosen])
        labels = torch.tensor([self.source.labels[chosen[k]] for k in kept], dtype=torch.long)
        return (torch.from_numpy(outputs[0]) if kept else torch.zeros(0, 3, 1, 1)), labels

    def stream(self, start_step: int):
        if start_step:  # a resumed run: fresh augmentation draws, not the first steps' again
            self.batches.reseed(int(counter_key(self.seed, self.rank, start_step) % 2**31))
        return prefetch(self.batch, start_step)


# ---------------------------------------------------------------- recipe pieces


def layer_decay_groups(model: BeitClassifier, lr: float, weight_decay: float, decay: float) -> list[dict]:
    """Parameter groups with lr x decay ^ (depth + 1 - layer id), no weight decay on 1-D
    parameters and the model's no-decay names (the released `param_groups_lrd`)."""
    depth = model.cfg.depth
    skip = model.no_weight_decay()
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = model.layer_id(name)
        no_decay = p.ndim == 1 or name.endswith(".bias") or name in skip
        key = (layer, no_decay)
        if key not in groups:
            scale = decay ** (depth + 1 - layer)
            groups[key] = {
                "params": [],
                "names": [],
                "lr_scale": scale,
                "lr": lr * scale,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def mix(pixels: torch.Tensor, labels: torch.Tensor, classes: int, cfg: FinetuneConfig, generator: np.random.Generator):
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


@torch.no_grad()
def evaluate(model: BeitClassifier, data: ClassificationData, device: torch.device, classes: int) -> dict:
    """Top-1, top-5, loss and per-class accuracy over a whole (unsharded) split."""
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    per_class = np.zeros((classes, 2), dtype=np.int64)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for step in range(data.steps_per_epoch):
        pixels, labels = data.batch(step)
        if not len(labels):
            continue
        with autocast:
            logits = model(pixels.to(device)).float()
        labels = labels.to(device)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, classes), dim=1).indices
        hit1 = top[:, 0] == labels
        correct1 += int(hit1.sum())
        correct5 += int((top == labels[:, None]).any(1).sum())
        total += len(labels)
        np.add.at(per_class, (labels.cpu().numpy(), 0), hit1.cpu().numpy().astype(np.int64))
        np.add.at(per_class, (labels.cpu().numpy(), 1), 1)
    model.train()
    return {
        "top1": correct1 / max(total, 1),
        "top5": correct5 / max(total, 1),
        "loss": loss_sum / max(total, 1),
        "images": total,
        "per_class": per_class.tolist(),
    }


# ---------------------------------------------------------------- the loop


def finetune(data_dir: Path, out: Path, cfg: FinetuneConfig, resume: bool = True, progress: bool = True) -> dict:
    dist = init_dist(timeout_minutes=cfg.dist_timeout_minutes)
    device = dist.device(cfg.device)
    device_id = device.index if device.type == "cuda" else None
    out = Path(out)
    train_source, val_source = read_splits(data_dir, cfg.held_out, cfg.seed)
    for source, split in ((train_source, "train"), (val_source, "val")):  # else ranks would mix up images and labels
        dist.check_same_listing(f"the {split} images of {data_dir}", source.fingerprint(), source.entries)
    classes = len(train_source.class_names)
    model_cfg = ModelConfig(**{**to_dict(cfg.model), "num_classes": cfg.model.num_classes or classes}).resolved()
    if model_cfg.num_classes != classes:
        raise ValueError(
            f"model.num_classes {model_cfg.num_classes} does not match the {classes} classes of {data_dir}/train."
        )
    torch.manual_seed(cfg.seed)
    model = BeitClassifier(model_cfg)
    notes = [] if cfg.init == "none" else load_pretrained(model, Path(cfg.init))
    model.to(device)
    train = ClassificationData(
        train_source, model_cfg.image_size, cfg.batch_size, True, cfg, dist.rank, dist.world, device_id
    )
    val = ClassificationData(val_source, model_cfg.image_size, cfg.batch_size, False, cfg, 0, 1, device_id)
    effective_batch = cfg.batch_size * dist.world
    lr = cfg.lr if cfg.lr is not None else cfg.blr * effective_batch / 1024
    total = cfg.epochs * train.steps_per_epoch
    warmup = round(cfg.warmup_epochs * train.steps_per_epoch)
    groups = layer_decay_groups(model, lr, cfg.weight_decay, cfg.layer_decay)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups], lr=lr, fused=device.type == "cuda"
    )
    identity = {
        "config": resume_fields(FinetuneConfig, to_dict(cfg)),
        "classes": train_source.class_names,
        "world_size": dist.world,
    }
    torch.manual_seed(cfg.seed + dist.rank)  # one weight init everywhere, drop path and erasing per rank
    step, best, result = 0, -1.0, {}
    checkpoint = out / "checkpoint.pt"
    if dist.resume_from(checkpoint, resume):
        state, meta = load_checkpoint(checkpoint)
        theirs = {k: meta.get(k) for k in identity}
        theirs["config"] = resume_fields(FinetuneConfig, theirs["config"])
        if json.dumps(theirs, sort_keys=True) != json.dumps(identity, sort_keys=True):
            raise ValueError(f"{checkpoint} is from another run: use another --out, or --no-resume to start over here.")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        dist.restore_rng(state["rng"], device)
        step, best, result = meta["step"], meta["best_top1"], meta.get("last_eval", {})
        dist.check_same(f"{checkpoint} at step", step)
        if not result and meta.get("top1", -1.0) >= 0:  # a checkpoint from before last_eval
            result = {"top1": meta["top1"]}
        if dist.main:
            print(f"resuming from {checkpoint} at step {step} of {total}", flush=True)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(to_toml(cfg))
        if step == 0:
            (out / "metrics.jsonl").write_text("")
        else:
            truncate_metrics(out / "metrics.jsonl", step)
    trained = model
    if dist.world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device_id is not None else None
        )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    stream = train.stream(step)
    bar = progress_bar(total=total, initial=step, disable=not (progress and dist.main), unit="step", desc="finetune")
    loss_sum, seen, started, logged_at = torch.zeros((), device=device), 0, time.perf_counter(), step

    def save(path: Path, rng: list[dict]) -> None:
        save_checkpoint(
            path,
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng},
            {
                "kind": "finetune",
                "step": step,
                "epoch": step / train.steps_per_epoch,
                "best_top1": best,
                "top1": result.get("top1", -1.0),
                "last_eval": {k: result[k] for k in ("top1", "top5", "loss") if k in result},
                "model": to_dict(model_cfg),
                "init": cfg.init,
                "effective_lr": lr,
                "class_names": train_source.class_names,
                **identity,
            },
        )

    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, cfg.min_lr, warmup, total) * group["lr_scale"]
        pixels, labels = next(stream)
        labels = labels.to(device, non_blocking=True)  # a blocking copy would wait for the GPU
        generator = np.random.default_rng([cfg.seed, dist.rank, step])
        pixels = pixels.to(device, non_blocking=True)
        pixels = random_erasing(pixels, cfg.erasing, generator)
        pixels, targets = mix(pixels, labels, classes, cfg, generator)
        with autocast:
            logits = trained(pixels)
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        seen += len(labels)
        step += 1
        bar.update(1)
        if dist.main and (step % cfg.log_every == 0 or step == total):
            elapsed = time.perf_counter() - started
            row = {
                "step": step,
                "epoch": step / train.steps_per_epoch,
                "loss": loss_sum.item() / (step - logged_at),
                "lr": optimizer.param_groups[-1]["lr"],
                "images_per_s": seen * dist.world / elapsed,
            }
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            loss_sum.zero_()
            seen, started, logged_at = 0, time.perf_counter(), step
        end_of_epoch = step % train.steps_per_epoch == 0
        evaluating = end_of_epoch and ((step // train.steps_per_epoch) % cfg.eval_every == 0 or step == total)
        saving = evaluating or step % cfg.checkpoint_every == 0 or step == total
        rng = dist.rng_states(device) if saving else []  # every rank's, before evaluation draws from them
        if evaluating and dist.main:
            result = evaluate(model, val, device, classes)
            row = {"step": step, "epoch": step / train.steps_per_epoch}
            row.update({f"eval_{k}": result[k] for k in ("top1", "top5", "loss")})
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if result["top1"] > best:
                best = result["top1"]
                save(out / "best.pt", rng)
        if saving:
            if dist.main:
                save(checkpoint, rng)
            dist.barrier()
    bar.close()
    dist.close()
    return {
        "steps": step,
        "best_top1": best,
        "last": result,
        "notes": notes,
        "effective_lr": lr,
        "checkpoint": str(checkpoint),
    }
