"""Stage 2: pre-train a BEiT ViT from a token store.

    beit pretrain STORE --out runs/pt --model base --epochs 800 --batch-size 64
    torchrun --nproc_per_node 8 -m beit pretrain STORE --out runs/pt --model base
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m beit pretrain STORE --out runs/pt

Each step: the pixels of one recorded view per image (rendered by DALI from the image the store
gives: its embedded copy, else the source file; `beit.train.pretrain.data`), its
cached token grid as the target, a blockwise mask; the ViT predicts the tokens of the masked
patches (cross-entropy); AdamW with the released parameter groups, warm-up + cosine, gradient
clipping, bf16 autocast on a GPU. No step runs the tokenizer, except with `targets = "online"`
(the reference code's way: a fresh view of each image every epoch, drawn as stage 1 draws them
(view e in epoch e, so the first V are the cached ones), and the dVAE on its 112 px twin at
every step); `targets = "pixels"` regresses the masked patches' raw pixels instead (the paper's
ablation, its Table 4: the pixel values as the model sees them, normalised only as the input is),
`targets = "normalised-pixels"` regresses them with each patch's own mean and variance removed (the
later masked-autoencoder target, a stronger one: kept under its own name), and `mask = "random"`
replaces blockwise masking.

RUN_DIR gets config.toml (the resolved config), metrics.jsonl (one object per logged step) and
checkpoint.pt (+ .json), written atomically every `checkpoint_every` steps and at the end.
Running the same command again resumes from it: same data position, RNG states and optimizer,
so on the CPU a resumed run's losses equal an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

from beit.shared.config import to_dict
from beit.shared.dist import DEFAULT_TIMEOUT_MINUTES
from beit.shared.dvae import Precision, encoder_sha256, load_tokenizer
from beit.shared.store import StoreError
from beit.shared.views import imagenet_stats
from beit.train.model import BeitForMIM, ModelConfig, mim_loss
from beit.train.pretrain.data import Batch, PretrainData, Sampling
from beit.train.pretrain.pictures import mim_picture
from beit.train.scaffold import RUN_SETTINGS, Run, lr_at, set_lr, warmup_epochs_of


@dataclass
class PretrainConfig:
    # keys a resumed run may change (they do not change what it computes)
    FREE_ON_RESUME: ClassVar[tuple[str, ...]] = (*RUN_SETTINGS, "compile", "data_cache", "source_root")
    # the lowest value of each key listed (load_config checks them)
    MINIMUM: ClassVar[dict[str, int]] = {
        **dict.fromkeys(("epochs", "batch_size", "accumulation", "log_every", "checkpoint_every"), 1),
        "threads": 0,
    }

    # image_size / vocab_size 0: take them from the store
    # 0s: the store's (image size, vocabulary, and the patch size its grid fixes)
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(preset="base", image_size=0, vocab_size=0, patch_size=0)
    )
    epochs: int = 800
    batch_size: int = 64  # per rank
    accumulation: int = 1
    lr: float | None = None  # the effective lr; none: blr x effective batch / 2048
    blr: float = 1.5e-3  # lr at an effective batch of 2048
    min_lr: float = 1e-5
    warmup_epochs: float = -1.0  # -1: the released share of the run (10 of 800 epochs)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 3.0
    seed: int = 0
    # cached | online: token ids; pixels: raw pixel regression (the paper's); normalised-pixels: per patch
    targets: Literal["cached", "online", "pixels", "normalised-pixels"] = "cached"
    mask: Literal["block", "random"] = "block"
    mask_count: int = 0  # 0: 75 of 196 patches, scaled to the grid
    views: int = 0  # 0: all the store's V views per image; K: only the first K (the V ablation)
    log_every: int = 20
    checkpoint_every: int = 1000
    compile: bool = False
    threads: int = 0  # DALI's CPU threads per rank; 0: the machine's cores shared among its local ranks
    # a node-local folder for the store's arrays, mapped by the node's ranks ("": the system's temporary folder)
    data_cache: str = ""
    source_root: str = ""  # the store's source files under another folder ("": where they were tokenized)
    device: str = "auto"
    dist_timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES  # torchrun: how long ranks wait while rank 0 works alone
    stop_signal: str = "SIGUSR1"  # stops the run cleanly, as SIGTERM does (SLURM --signal); none: SIGTERM only
    tensorboard: bool = False  # also write TensorBoard event files into the run folder's tensorboard/


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The released groups: no weight decay on biases, norms (1-D parameters) and the names
    the model lists (cls token)."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


PIXEL_TARGETS = ("pixels", "normalised-pixels")


def pixel_targets(pixels: torch.Tensor, patch: int, normalised: bool = False) -> torch.Tensor:
    """[B, 3, H, W] ImageNet-normalised -> [B, N, patch*patch*3]: each patch's pixels as the
    input holds them (the paper's raw-pixel target), or with `normalised` the patch's own
    pixels (0-1) with its mean and variance removed (the masked-autoencoder target)."""
    x = pixels
    if normalised:
        mean, std = imagenet_stats(pixels.device)  # [3, 1, 1]: broadcast over the batch
        x = pixels * std + mean
    b, c, h, w = x.shape
    x = x.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, patch * patch * c)
    if not normalised:
        return x
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()


def mim_step_loss(
    forward,
    pixels: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    targets: torch.Tensor | None,
    patch: int,
    normalised: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The step's forward and loss, with static shapes (the K padded masked positions of each
    image): (loss, correct predictions, masked patches); `targets` [B, N] token ids, or None to
    regress each masked patch's pixels (`pixel_targets`, per-patch `normalised` or raw). What the
    trainer runs and bench/speed/train_step.py times."""
    output = forward(pixels, mask, positions=positions)  # [B, K, vocab]
    if targets is None:
        patches = pixel_targets(pixels, patch, normalised)
        picked = patches.gather(1, positions.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        weight = valid.unsqueeze(-1).float()
        loss = ((output.float() - picked) ** 2 * weight).sum() / (weight.sum() * patches.shape[-1])
        return loss, None, None
    loss = mim_loss(output, targets, positions=positions, valid=valid)
    correct = ((output.argmax(-1) == targets.gather(1, positions)) & valid).sum()
    return loss, correct, valid.sum()


class MIMStep:
    """One optimizer step of pre-training on `PretrainData` batches: the copies to the device
    (non-blocking: the data thread pins what it makes on the host), the forward and loss with
    static shapes (`mim_step_loss`), backward (no all-reduce before the last micro-batch),
    clipping and AdamW. Nothing in it waits for the GPU: the loss and accuracy sums stay on the
    device (`sums`: loss, correct, predictions) until the trainer reads them at a log step (a
    GPU test holds it to that with torch.cuda.set_sync_debug_mode)."""

    def __init__(self, model, trained, optimizer, cfg: PretrainConfig, device: torch.device, online=None):
        self.model, self.trained, self.optimizer, self.cfg, self.device = model, trained, optimizer, cfg, device
        self.forward = torch.compile(trained) if cfg.compile else trained
        self.online = online  # (tokenizer, Precision): targets tokenized from each batch's twin view
        self.sums = torch.zeros(3, device=device)

    def __call__(self, next_batch, lr: float) -> torch.Tensor:
        """Run one step on `accumulation` batches from `next_batch()` at learning rate `lr`; the
        gradient norm before clipping (a device tensor)."""
        cfg, device = self.cfg, self.device
        set_lr(self.optimizer, lr)
        for micro in range(cfg.accumulation):
            batch = next_batch()
            pixels = batch.pixels.to(device, non_blocking=True)
            mask = batch.mask.to(device, non_blocking=True)
            positions = batch.positions.to(device, non_blocking=True)
            valid = batch.valid.to(device, non_blocking=True)
            if self.online is not None:
                tokenizer, precision = self.online
                targets = precision.tokenize(tokenizer, batch.twin.to(device, non_blocking=True)).flatten(1)
            else:
                targets = batch.tokens.to(device, non_blocking=True) if cfg.targets == "cached" else None
            last = micro == cfg.accumulation - 1
            context = contextlib.nullcontext() if last or self.trained is self.model else self.trained.no_sync()
            with context, torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, correct, count = mim_step_loss(
                    self.forward,
                    pixels,
                    mask,
                    positions,
                    valid,
                    targets,
                    self.model.cfg.patch_size,
                    normalised=cfg.targets == "normalised-pixels",
                )
            (loss / cfg.accumulation).backward()
            with torch.no_grad():
                self.sums[0] += loss.detach()
                if correct is not None:
                    self.sums[1] += correct
                    self.sums[2] += count
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm


# what a resumed run may change: the data plan is re-cut from where the checkpoint stopped
ELASTIC = ("world_size", "config.batch_size", "config.accumulation")


def resume_origin(meta: dict, data: PretrainData, cfg: PretrainConfig, world: int) -> dict:
    """Where a resumed run's data plan starts: the checkpoint's own origin when the global batch
    and accumulation are the same; else a new origin at the checkpoint's step, at the (epoch,
    position) its plan had reached, so the epoch in progress goes on with no image repeated or
    skipped (the model and optimizer are replicated, only the data is re-cut). Each rank's random
    states come back for the ranks the checkpoint had; a new rank's are seeded afresh."""
    saved = meta.get("data_position", {})
    origin = saved.get("origin", {"step": 0, "epoch": 0, "position": 0})
    config, their_world = meta["config"], meta["world_size"]
    if (config["batch_size"] * their_world, config["accumulation"]) == (cfg.batch_size * world, cfg.accumulation):
        return origin
    theirs = data.plan.resharded(config["batch_size"], 0, their_world, (origin["epoch"], origin["position"]))
    epoch, position = theirs.position((meta["step"] - origin["step"]) * config["accumulation"])
    if data.plan.rank == 0:
        then = f"{their_world} x {config['batch_size']} x {config['accumulation']}"
        print(
            f"resuming on {world} ranks x {cfg.batch_size} images x {cfg.accumulation} accumulated (the checkpoint's "
            f"run: {then}): the data goes on at image {position} of epoch {epoch}",
            flush=True,
        )
    return {"step": meta["step"], "epoch": int(epoch), "position": int(position)}


def build_model_config(cfg: PretrainConfig, data: PretrainData, location: str) -> ModelConfig:
    """The model's config, its image size, vocabulary and patch size taken from the store unless
    set, checked against it."""
    model_cfg = ModelConfig(**to_dict(cfg.model))
    store_vocab = data.store.vocab_size
    model_cfg.image_size = model_cfg.image_size or data.image_size
    model_cfg.vocab_size = model_cfg.vocab_size or store_vocab
    model_cfg.patch_size = model_cfg.patch_size or data.image_size // data.grid[0]  # the store's grid fixes it
    model_cfg = model_cfg.resolved()
    if model_cfg.grid != data.grid:
        raise StoreError(
            f"the model's patch grid {model_cfg.grid} ({model_cfg.image_size} px / {model_cfg.patch_size}) does not "
            f"match {location}'s token grid {data.grid}: set model.image_size={data.image_size} (or leave it 0)."
        )
    if cfg.targets not in PIXEL_TARGETS and model_cfg.vocab_size != store_vocab:
        raise StoreError(
            f"model.vocab_size {model_cfg.vocab_size} does not match {location}'s tokenizer vocabulary {store_vocab}: "
            "leave model.vocab_size 0 to take it from the store."
        )
    if cfg.targets in PIXEL_TARGETS:
        model_cfg.vocab_size = model_cfg.patch_size**2 * 3  # the head regresses a patch's pixels
    return model_cfg


def build_online_tokenizer(data: PretrainData, location: str, device: torch.device):
    """The store's own tokenizer, for `targets = "online"`: from its recorded path, checked."""
    path = data.store.tokenizer_path
    if path is None or not path.exists():
        raise StoreError(f"--targets online needs {location}'s tokenizer, and its recorded path {path} is gone.")
    tokenizer = load_tokenizer(path, device)
    if encoder_sha256(tokenizer) != data.store.tokenizer_sha256:
        raise StoreError(f"{path} is no longer the tokenizer {location} was made with.")
    return tokenizer


def pretrain(
    store: str, out: Path, cfg: PretrainConfig, resume: bool = True, progress: bool = True, save: bool = True
) -> dict:
    """Stage 2. `save=False` writes no checkpoint, not even the last (benchmarks that time steps)."""
    run = Run(out, cfg, "pretrain", progress)
    run.origins.update(warmup_epochs_of(cfg, (10, 800)))  # before the run's identity records the config
    dist, device = run.dist, run.device
    online = cfg.targets == "online"
    data = build_data(store, cfg, run)
    model_cfg = build_model_config(cfg, data, store)
    tokenizer = build_online_tokenizer(data, store, device) if online else None
    precision = Precision.recorded(data.store.tokenizer_precision, device)  # as the store's tokens were made

    torch.manual_seed(cfg.seed)
    model = BeitForMIM(model_cfg).to(device)
    torch.manual_seed(cfg.seed + dist.rank)  # one weight init everywhere, stochastic depth per rank
    effective_batch = cfg.batch_size * dist.world * cfg.accumulation
    lr = cfg.lr if cfg.lr is not None else cfg.blr * effective_batch / 2048
    steps_per_epoch = optimizer_steps_per_epoch(cfg, data)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=lr, betas=cfg.betas, eps=cfg.eps, fused=device.type == "cuda"
    )
    identity = run.identity(store_fingerprint=data.store.source_fingerprint, tokenizer=data.store.tokenizer_sha256)
    dist.check_same(f"the store {store} with fingerprint, tokenizer and images", (*identity.values(), len(data.store)))
    # another world size, batch size or accumulation continues the data where it stopped (`resume_origin`)
    meta = run.resume(resume, model, optimizer, None, elastic=ELASTIC)
    step = meta["step"] if meta else 0
    origin = resume_origin(meta, data, cfg, dist.world) if meta else {"step": 0, "epoch": 0, "position": 0}
    if (origin["epoch"], origin["position"]) != (0, 0):
        data.restart_at((origin["epoch"], origin["position"]))
    # optimizer steps: the origin's, then the micro-batches left to the last epoch's end
    total = origin["step"] + round(data.plan.steps_until(cfg.epochs) / cfg.accumulation)
    # the schedule follows the data: a re-cut plan starts it at the epochs done, counted in this
    # run's steps, so neither warm-up nor cosine jumps when the global batch changes
    schedule_start = data.plan.epoch_at(0) * steps_per_epoch if origin["step"] else 0.0
    schedule_total = schedule_start + (total - origin["step"])
    run.start(step)
    trained = run.wrap(model)
    train_step = MIMStep(model, trained, optimizer, cfg, device, online=(tokenizer, precision) if online else None)

    stream = data.stream((step - origin["step"]) * cfg.accumulation)  # the data plan's micro-batch at `step`
    bar = run.bar(total, step)
    meter = StepMeter(train_step.sums, step)
    while step < total:
        at = schedule_start + (step - origin["step"])  # = step, unless the plan was re-cut
        grad_norm = train_step(lambda: meter.next(stream), lr_at(at, lr, cfg.min_lr, warmup, schedule_total))
        meter.images += cfg.batch_size * cfg.accumulation
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            epoch = data.plan.epoch_at((step - origin["step"]) * cfg.accumulation)
            row = meter.row(step, epoch, cfg, optimizer, grad_norm, dist.world)
            run.log(row)
            bar.set_postfix(
                loss=f"{row['loss']:.3f}",
                acc=f"{row.get('mim_accuracy', 0):.3f}",
                img_s=f"{row['images_per_s']:.0f}",
                wait=f"{row['data_wait']:.2f}",
            )
        stopping = run.stopping()  # a stop signal: save this step and stop (every rank at the same step)
        if save and (step % cfg.checkpoint_every == 0 or step == total or stopping):
            rng = dist.rng_states(device)  # every rank's: each draws its own drop path
            meta = {
                **data_position(step, origin, data, cfg),
                "effective_lr": lr,
                "effective_batch": effective_batch,
                "seed": cfg.seed,
                "model": to_dict(model_cfg),
                "store": store,
            }
            run.save(run.checkpoint, model, optimizer, rng, meta)
            if run.board is not None and cfg.targets == "cached":
                batch = meter.last
                # building the picture's tokenizer draws its initial weights: from a fork of the
                # random state, so a run with TensorBoard goes on as its checkpoint's resume does
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    tokenizer = picture_tokenizer(data.store)
                    picture = mim_picture(model, batch.pixels, batch.mask, batch.tokens, tokenizer)
                run.picture("predictions (view, masked, right/wrong, targets, predicted)", picture, step)
            dist.barrier()
        if stopping and step < total:  # at the last step the run is done: it ends as usual
            bar.close()
            stream.close()
            run.preempted(step, saved=save)
    bar.close()
    stream.close()
    run.close()
    return {"steps": step, "effective_lr": lr, "effective_batch": effective_batch, "checkpoint": str(run.checkpoint)}


@functools.cache
def _tokenizer_at(path: str):
    return load_tokenizer(Path(path))


def picture_tokenizer(store):
    """The store's tokenizer, for pictures of reconstructions, when its file is still where the
    store was made (else None: the pictures leave the reconstructions out)."""
    path = store.tokenizer_path
    return _tokenizer_at(str(path)) if path is not None and path.is_file() else None


def build_data(store: str, cfg: PretrainConfig, run: Run) -> PretrainData:
    """This rank's pre-training data from the store (with twin views and fresh ones per epoch for
    online targets)."""
    online = cfg.targets == "online"
    sampling = Sampling(cfg.batch_size, cfg.seed, run.dist.rank, run.dist.world, cfg.mask, cfg.mask_count)
    return PretrainData(
        store,
        sampling,
        twin=online,
        fresh=online,
        threads=cfg.threads,
        device_id=run.device_id,
        views=cfg.views,
        data_cache=cfg.data_cache,
        source_root=cfg.source_root,
    )


def optimizer_steps_per_epoch(cfg: PretrainConfig, data: PretrainData) -> float:
    """Optimizer steps per epoch (an epoch may end mid-accumulation); refuses a run of no step."""
    steps_per_epoch = data.steps_per_epoch / cfg.accumulation
    if round(cfg.epochs * steps_per_epoch) < 1:
        raise ValueError(
            f"--epochs {cfg.epochs} is less than one optimizer step: an epoch is {data.steps_per_epoch} batches and "
            f"accumulation is {cfg.accumulation}; lower accumulation or --batch-size, or raise --epochs."
        )
    return steps_per_epoch


class StepMeter:
    """What a metrics row reports since the last one: the step's loss sums (on the device), images,
    time, and the time spent waiting for data."""

    def __init__(self, sums: torch.Tensor, step: int):
        self.sums, self.logged_at = sums, step
        self.wait, self.images, self.last_log = 0.0, 0, time.perf_counter()

    def next(self, stream) -> Batch:
        """The stream's next batch, the wait for it counted."""
        t0 = time.perf_counter()
        batch = next(stream)
        self.wait += time.perf_counter() - t0
        self.last = batch  # for the pictures
        return batch

    def row(self, step: int, epoch: float, cfg: PretrainConfig, optimizer, grad_norm, world: int) -> dict:
        """The metrics row; then starts the next interval."""
        values = self.sums.tolist()  # the one host synchronisation, at logging intervals
        elapsed = time.perf_counter() - self.last_log
        row = {
            "step": step,
            "epoch": epoch,
            "loss": values[0] / ((step - self.logged_at) * cfg.accumulation),
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm),
            "images_per_s": self.images * world / elapsed,
            "data_wait": self.wait / elapsed,
        }
        if cfg.targets not in PIXEL_TARGETS:
            row["mim_accuracy"] = values[1] / max(values[2], 1)
        self.sums.zero_()
        self.wait, self.images, self.last_log, self.logged_at = 0.0, 0, time.perf_counter(), step
        return row


def data_position(step: int, origin: dict, data: PretrainData, cfg: PretrainConfig) -> dict:
    """Where a checkpoint at `step` stands: the step, the epoch and the data's position."""
    micro = (step - origin["step"]) * cfg.accumulation
    epoch, position = data.plan.position(micro)
    return {
        "step": step,
        "epoch": data.plan.epoch_at(micro),
        # where the data stands: micro-batch `micro_batch` of the plan that starts at `origin`
        # (global micro-batches of `global_batch` images), the next one at `position` of `epoch`
        "data_position": {
            "micro_batch": micro,
            "origin": origin,
            "global_batch": data.plan.global_batch,
            "epoch": epoch,
            "position": position,
        },
    }
