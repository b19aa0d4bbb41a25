"""Train your own dVAE tokenizer (for images unlike the DALL-E data, or without its weights).

    beit tokenizer train IMAGES -o tokenizer.safetensors [--steps 2000] [--config F --set k=v]

IMAGES is a folder (searched recursively) or a text file listing image paths. Training views are
random resized crops of `input_size` pixels with random flips, decoded and cropped by DALI (on
the GPU when there is one). The model is the DALL-E dVAE of `beit.shared.dvae`, smaller by
default, with the encoder's logits computed as a scaled cosine similarity to normalised code
vectors (`cosine_logits`), which keeps the codebook from collapsing onto a few codes.

Loss per step, with q = softmax(encoder logits) over the codebook at each grid position:
- reconstruction of the (mapped) pixels from Gumbel-softmax samples of q, temperature
  annealed from `temperature_start` to `temperature_end`: logit-Laplace NLL (the DALL-E
  loss), or L1 / MSE;
- `kl_weight` x KL(q || uniform) per position (the DALL-E prior term), and
- `usage_weight` x KL(mean of q over the batch || uniform), which pushes the batch-average
  code usage toward uniform; both weights warm up linearly over `warmup_steps`.

The run stands on the trainers' scaffold (`beit.train.scaffold.Run`) in the folder `OUT.run/`:
config.toml, metrics.jsonl, the learning-rate schedule every trainer uses (`lr_at`: linear
warm-up over `warmup_steps`, cosine to `min_lr`), and `checkpoint.pt` written atomically every
`checkpoint_every` steps with the random state; running the same command again resumes from it
(refused when the images or a setting that changes the result differ). At the end the tokenizer
is written to OUT with a JSON sidecar holding its codebook use (perplexity and dead codes) and
PSNR on held-out crops against the PSNR of each crop's own mean colour; the images that could not
be read, and why, are in the run folder's skipped.jsonl (a run stops when more than
`max_skipped_fraction` of those tried are unreadable). The held-out images (`held_out`) and their
`eval_batches` batches of crops are drawn from `split_seed`, not from `seed`, so that runs with
different seeds are compared on the same crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from beit.shared.checkpoint import previous
from beit.shared.config import to_dict
from beit.shared.decode import ImageBatches, as_tensor, pipeline_builder, require_dali
from beit.shared.dist import DEFAULT_TIMEOUT_MINUTES, dali_device_id
from beit.shared.dvae import DVAE, DVAEConfig, check_grid, map_pixels, save_tokenizer, unmap_pixels
from beit.shared.images import list_images
from beit.shared.inputs import MAX_SKIPPED_FRACTION, Inputs, SkippedLog
from beit.train.scaffold import RUN_SETTINGS, LossMeter, Run, lr_at, set_lr


def _trainer_model() -> DVAEConfig:
    """The architecture a self-trained tokenizer starts from: smaller than DALL-E's, cosine logits."""
    return DVAEConfig(n_hid=64, blocks_per_group=1, group_count=4, vocab_size=1024, n_init=64, cosine_logits=True)


@dataclass
class DVAETrainConfig:
    # the lowest value of each key listed (load_config checks them)
    MINIMUM: ClassVar[dict[str, int]] = {
        **dict.fromkeys(("steps", "batch_size", "log_every", "checkpoint_every"), 1),
        "threads": 0,
    }
    FREE_ON_RESUME: ClassVar[tuple[str, ...]] = RUN_SETTINGS

    input_size: int = 64
    model: DVAEConfig = field(default_factory=_trainer_model)  # the architecture: model.n_hid, model.vocab_size, ...
    loss: Literal["logit-laplace", "l1", "mse"] = "logit-laplace"
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 2e-5  # the cosine schedule's end (1% of lr)
    weight_decay: float = 0.0
    temperature_start: float = 1.0
    # DALL-E anneals to 1/16 over 150k+ steps. In a run of a few hundred steps that puts the last
    # third below 0.25, where the Gumbel-softmax gradients (scale 1/temperature) are noisiest, and
    # 2 seeds in 8 of the tokenizer test's old run (16 whole photos) ended 0.6-2 dB below the
    # rest; ending at 0.5 brought all 8 within 0.5 dB of each other (issue 11, bench/RESULTS.md).
    temperature_end: float = 0.5
    kl_weight: float = 0.0
    usage_weight: float = 0.3
    warmup_steps: int = 200  # of the learning rate and of the KL and usage weights
    min_crop_area: float = 0.08
    held_out: float = 0.1
    split_seed: int = 0  # which images are held out, and their evaluation crops: apart from `seed`
    eval_batches: int = 16
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    threads: int = 0  # DALI's CPU threads per rank; 0: the machine's cores shared among its local ranks
    device: str = "auto"
    dist_timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES
    stop_signal: str = "SIGUSR1"  # stops the run cleanly, as SIGTERM does (SLURM --signal); none: SIGTERM only
    tensorboard: bool = False  # also write TensorBoard event files into the run folder's tensorboard/
    # stop when more of the images tried than this share cannot be read (once 10 are): a wrong path or mount
    max_skipped_fraction: float = MAX_SKIPPED_FRACTION


def temperature_at(step: int, cfg: DVAETrainConfig) -> float:
    """Exponential annealing from temperature_start to temperature_end over the run."""
    progress = min(step / max(cfg.steps - 1, 1), 1.0)
    return cfg.temperature_start * (cfg.temperature_end / cfg.temperature_start) ** progress


def warmup_at(step: int, cfg: DVAETrainConfig) -> float:
    return min(1.0, (step + 1) / max(cfg.warmup_steps, 1))


def reconstruction_loss(stats: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """stats [B, 6, H, W] from the decoder, target [B, 3, H, W] mapped pixels in (0.1, 0.9)."""
    mu, log_b = stats[:, :3], stats[:, 3:]
    if kind == "logit-laplace":
        logit = torch.log(target) - torch.log1p(-target)
        nll = math.log(2.0) + log_b + torch.log(target * (1 - target)) + (logit - mu).abs() * torch.exp(-log_b)
        return nll.mean()
    prediction = torch.sigmoid(mu)
    return F.l1_loss(prediction, target) if kind == "l1" else F.mse_loss(prediction, target)


def codebook_use(counts: torch.Tensor) -> tuple[float, int]:
    """(perplexity of the code histogram, number of codes never used)."""
    p = counts.float() / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return math.exp(entropy), int((counts == 0).sum())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def crop_builder(cfg: DVAETrainConfig):
    """A DALI pipeline factory for `ImageBatches`: decode ('mixed' on a GPU), random resized
    crop to input_size, random flip, [0, 1] CHW float."""
    require_dali()
    from nvidia.dali import fn, types

    def graph(images, device_id):
        images = fn.random_resized_crop(
            images, size=[cfg.input_size] * 2, random_area=[cfg.min_crop_area, 1.0], antialias=True
        )
        return fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[0.0] * 3,
            std=[255.0] * 3,
            mirror=fn.random.coin_flip(),
        )

    return pipeline_builder(graph, cfg.threads)


class CropStream:
    """Batches of crops in a deterministic order: a fresh permutation of the files every epoch
    (from seed and epoch), batch k always the k-th slice of that stream, so a resumed run
    continues where it stopped. Files that fail to decode are skipped and recorded (`inputs`)."""

    def __init__(
        self,
        files: list[Path],
        cfg: DVAETrainConfig,
        seed: int,
        device: torch.device,
        start_batch: int = 0,
        inputs: Inputs | None = None,
    ):
        self.files, self.cfg, self.seed, self.device = files, cfg, seed, device
        self.batches = ImageBatches(crop_builder(cfg), cfg.batch_size, dali_device_id(device), seed + start_batch)
        self.position = start_batch * cfg.batch_size
        self.inputs = inputs or Inputs("the images", len(files), lambda i: str(files[i]), cfg.max_skipped_fraction)

    def _index_at(self, position: int) -> int:
        epoch, index = divmod(position, len(self.files))
        return int(np.random.default_rng([self.seed, epoch]).permutation(len(self.files))[index])

    def next(self) -> torch.Tensor:
        arrays: list[np.ndarray] = []
        while len(arrays) < self.cfg.batch_size:
            if len(self.batches.failed) == len(self.files):
                raise ValueError("none of the images could be decoded: " + _failures(self.batches.failed))
            wanted = []
            while len(wanted) < self.cfg.batch_size - len(arrays):
                index = self._index_at(self.position)
                self.position += 1
                if self.files[index] not in self.batches.failed:
                    wanted.append(index)
            files = [self.files[i] for i in wanted]
            before = set(self.batches.failed)
            outputs, kept = self.batches.run(files)
            for path in set(self.batches.failed) - before:
                print(f"skipping {path}: {self.batches.failed[path]}", flush=True)
            self.inputs.account(wanted, files, kept, self.batches.failed)
            if kept:
                arrays.extend(as_tensor(outputs[0]))
        return torch.stack(arrays).to(self.device)


def stream_inputs(images: Path, files: list[Path], split: str, cfg: DVAETrainConfig, log: SkippedLog) -> Inputs:
    """The `Inputs` of one split of the images: its skipped files into the run's `log`."""
    names = [str(f) for f in files]
    return Inputs(str(images), len(files), names.__getitem__, cfg.max_skipped_fraction, split=split, log=log)


def _failures(failed: dict[Path, str], limit: int = 3) -> str:
    shown = "; ".join(f"{path}: {reason}" for path, reason in list(failed.items())[:limit])
    return shown + (f" and {len(failed) - limit} more" if len(failed) > limit else "")


def split_files(files: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """A fixed held-out share of the images (at least one when there are two or more)."""
    order = np.random.default_rng(seed).permutation(len(files))
    held = max(1, round(len(files) * fraction)) if len(files) > 1 and fraction > 0 else 0
    return [files[i] for i in sorted(order[held:])], [files[i] for i in sorted(order[:held])]


def held_out_quality(model: DVAE, stream: CropStream, batches: int) -> dict:
    """Hard-token reconstructions of held-out crops: PSNR against the crops, the same for each
    crop's own mean colour (the constant baseline: one flat colour per crop), and code usage."""
    model.eval()
    counts = torch.zeros(model.cfg.vocab_size, dtype=torch.long)
    errors, baseline = [], []
    with torch.no_grad():
        for _ in range(batches):
            pixels = stream.next()
            tokens = model.tokenize(pixels)
            counts += torch.bincount(tokens.flatten().cpu(), minlength=model.cfg.vocab_size)
            errors.append(F.mse_loss(model.reconstruct(tokens), pixels).item())
            mean = pixels.mean(dim=(2, 3), keepdim=True).expand_as(pixels)
            baseline.append(F.mse_loss(mean, pixels).item())
    perplexity, dead = codebook_use(counts)
    model.train()
    return {
        "psnr": 10 * math.log10(1 / np.mean(errors)),
        "baseline_psnr": 10 * math.log10(1 / np.mean(baseline)),
        "perplexity": perplexity,
        "dead_codes": dead,
        "codes_used": model.cfg.vocab_size - dead,
    }


def dvae_loss(model: DVAE, pixels: torch.Tensor, step: int, cfg: DVAETrainConfig) -> tuple:
    """The training loss at `step` (reconstruction through Gumbel-softmax codes, plus the warmed-up
    KL and codebook-usage terms), the encoder's logits and the decoder's statistics."""
    target = map_pixels(pixels)
    logits = model.encoder(target)
    soft = F.gumbel_softmax(logits, tau=temperature_at(step, cfg), dim=1)
    stats = model.decoder(soft)
    recon = reconstruction_loss(stats, target, cfg.loss)
    log_q = logits.log_softmax(1)
    log_k = math.log(cfg.model.vocab_size)
    kl = (log_q.exp() * log_q).sum(1).mean() + log_k
    usage = log_q.exp().mean(dim=(0, 2, 3))
    usage_kl = (usage * usage.clamp(min=1e-12).log()).sum() + log_k
    warm = warmup_at(step, cfg)
    return recon + warm * (cfg.kl_weight * kl + cfg.usage_weight * usage_kl), logits, stats


def run_folder(out: Path) -> Path:
    """The training run's folder beside the tokenizer file: OUT.run/ (config.toml, metrics.jsonl,
    checkpoint.pt while training)."""
    return Path(out).with_suffix(".run")


def prepare_split(images: Path, cfg: DVAETrainConfig) -> tuple[list[Path], list[Path]]:
    """(training images, held-out images) of `images`; refuses a split that leaves none to train on."""
    files = list_images(images)
    # The split and the evaluation crops do not follow the training seed: runs that differ only in
    # their seed are measured on the same crops (with a seed-chosen split, 3 held-out photos swung
    # the mean-colour baseline from 13 to 24 dB between seeds; bench/RESULTS.md, issue 11).
    train_files, held_files = split_files(files, cfg.held_out, cfg.split_seed)
    if not train_files:
        raise ValueError(
            f"held_out={cfg.held_out} leaves none of the {len(files)} images of {images} for training: lower held_out."
        )
    return train_files, held_files


class TrainingStats:
    """What a metrics row shows besides the loss: the last batch's reconstruction PSNR (soft codes)
    and the perplexity of the codes chosen since the last row."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.counts = torch.zeros(vocab_size, dtype=torch.long, device=device)

    def add(self, logits: torch.Tensor) -> None:
        self.counts += torch.bincount(logits.argmax(1).flatten(), minlength=len(self.counts))

    def row(self, stats: torch.Tensor, pixels: torch.Tensor) -> dict:
        with torch.no_grad():
            error = F.mse_loss(unmap_pixels(torch.sigmoid(stats[:, :3])), pixels).item()
        perplexity, _ = codebook_use(self.counts.cpu())
        self.counts.zero_()
        return {"psnr": 10 * math.log10(1 / max(error, 1e-10)), "perplexity": perplexity}


def train_dvae(images: Path, out: Path, cfg: DVAETrainConfig, resume: bool = True, progress: bool = True) -> dict:
    """Train a dVAE on `images` and write it to `out`; returns the final report. The run (config,
    metrics, checkpoints, resume) is the scaffold's, in `run_folder(out)`."""
    out = Path(out)
    check_grid(cfg.input_size, cfg.model)
    train_files, held_files = prepare_split(images, cfg)
    run = Run(run_folder(out), cfg, "dvae-train", progress)
    if run.dist.world > 1:
        raise ValueError("beit tokenizer train runs as one process: start it without torchrun.")
    torch.manual_seed(cfg.seed)
    model = DVAE(cfg.model).to(run.device, memory_format=torch.channels_last).train()  # faster convs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run.identity(images=str(images))
    meta = run.resume(resume, model, optimizer, cfg.steps)
    step = meta["step"] if meta else 0
    run.start(step)
    log = run.skipped_log(resume)
    inputs = stream_inputs(images, train_files, "train", cfg, log)
    stream = CropStream(train_files, cfg, cfg.seed, run.device, start_batch=step, inputs=inputs)

    bar, meter = run.bar(cfg.steps, step), LossMeter(run.device, step)
    stats = TrainingStats(cfg.model.vocab_size, run.device)
    while step < cfg.steps:
        pixels = stream.next().contiguous(memory_format=torch.channels_last)
        set_lr(optimizer, lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps))
        loss, logits, decoded = dvae_loss(model, pixels, step, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        meter.add(loss, pixels.shape[0])
        stats.add(logits)
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = meter.row(step, optimizer, 1, **stats.row(decoded, pixels))
            run.log(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", psnr=f"{row['psnr']:.1f}", ppl=f"{row['perplexity']:.0f}")
        bar.update(1)
        stopping = run.stopping()  # a stop signal: save this step and stop
        if (step % cfg.checkpoint_every == 0 or stopping) and step < cfg.steps:
            run.save(run.checkpoint, model, optimizer, run.dist.rng_states(run.device), {"step": step})
        if stopping and step < cfg.steps:
            bar.close()
            run.preempted(step)
    bar.close()
    report = finish(model, run, out, stream, held_files, images, cfg, log)
    run.close()
    return report


def finish(
    model: DVAE, run: Run, out: Path, stream: CropStream, held_files: list[Path], images: Path, cfg, log: SkippedLog
) -> dict:
    """Measure the model on the held-out crops (logged as the run's last row), write the tokenizer
    to the file beside the run folder and drop the run's checkpoint; the report."""
    report = {
        "steps": cfg.steps,
        "train_images": len(stream.files),
        "held_out_images": len(held_files),
        "failed_images": {str(k): v for k, v in stream.batches.failed.items()},
        "inputs": {"train": stream.inputs.summary()},
    }
    if held_files:
        # random crops of the held-out images, as the model saw in training, from a fixed seed
        inputs = stream_inputs(images, held_files, "held_out", cfg, log)
        held_stream = CropStream(held_files, cfg, cfg.split_seed + 12345, run.device, inputs=inputs)
        report["held_out"] = held_out_quality(model, held_stream, cfg.eval_batches)
        report["inputs"]["held_out"] = held_stream.inputs.summary()
        run.log({"step": cfg.steps, **{f"eval_{k}": v for k, v in report["held_out"].items()}})
    info = save_tokenizer(
        model.cpu(),
        out,
        input_size=cfg.input_size,
        extra={"trained_on": str(images), "train_config": to_dict(cfg), "report": report},
    )
    for path in (run.checkpoint, previous(run.checkpoint)):
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
    return {**report, "sha256": info["sha256"]}
