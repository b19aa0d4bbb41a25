"""The run scaffold every trainer stands on: what pre-training, fine-tuning and any later trainer
do around their loop, written once.

    run = Run(out, cfg, "finetune")           # torchrun group, this rank's device, the run folder
    run.identity(classes=names)                # what must match to resume (+ the config, world size)
    meta = run.resume(resume, model, optimizer, total)   # checked, loaded, RNG restored; None: fresh
    run.start(step)                            # config.toml, metrics.jsonl (rows past `step` dropped)
    trained = run.wrap(model)                  # DDP under torchrun
    set_lr(optimizer, lr_at(step, ...)); run.log(row); run.save(path, model, optimizer, rng, meta)

A run folder holds config.toml (the resolved config), metrics.jsonl (one JSON object per row)
and checkpoints (`beit.shared.checkpoint`: tensors + a JSON of step, config, identity). Running
the same command again resumes from `checkpoint.pt` when its identity (the config less the keys
the config class frees on resume, what the trainer adds, the world size) equals this run's;
otherwise it is refused, naming what differs. Also here: the lr schedule (`lr_at`, `set_lr`).
Data modules prepare batches ahead in a thread with `beit.shared.prefetch`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from beit.shared.checkpoint import CheckpointError, load_checkpoint, previous, save_checkpoint
from beit.shared.config import ConfigError, differences, resume_fields, to_dict, to_toml
from beit.shared.decode import require_dali
from beit.shared.dist import dali_device_id, init_dist
from beit.shared.inputs import Inputs, SkippedLog
from beit.shared.preempt import Preempted, StopSignals, clear_marker, write_marker
from beit.shared.progress import progress_bar
from beit.shared.space import DiskFull, no_room, out_of_space

# Config keys of how a run runs, not what it computes: every trainer's resumed run may change them.
RUN_SETTINGS = (
    "log_every", "checkpoint_every", "threads", "device", "dist_timeout_minutes", "tensorboard", "stop_signal",
    "max_skipped_fraction",
)  # fmt: skip


def lr_at(step: int, base: float, minimum: float, warmup: int, total: int) -> float:
    """Linear warm-up from 0 to `base` over `warmup` steps, then cosine to `minimum` at `total`."""
    if step < warmup:
        return base * step / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return minimum + (base - minimum) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr to `lr` times the group's `lr_scale` (layer-wise decay; 1 without)."""
    for entry in optimizer.param_groups:
        entry["lr"] = lr * entry.get("lr_scale", 1.0)


def layer_decay_groups(model: torch.nn.Module, lr: float, weight_decay: float, decay: float) -> list[dict]:
    """Parameter groups with lr x decay ^ (depth + 1 - layer id) (`model.layer_id(name)`: the
    released ids, the heads at depth + 1), no weight decay on 1-D parameters and the model's
    no-decay names (the released `param_groups_lrd` and mmseg's layer-decay constructor)."""
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


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint (they are logged again) and a row the
    crash cut in half."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in kept))


class LossMeter:
    """The training loss and images since the last metrics row, kept on the device until a log
    step reads them (the one host synchronisation)."""

    def __init__(self, device: torch.device, step: int):
        self.total = torch.zeros((), device=device)
        self.images, self.started, self.logged_at = 0, time.perf_counter(), step

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.total += loss.detach()
        self.images += images

    def row(self, step: int, optimizer: torch.optim.Optimizer, world: int, **extra: Any) -> dict:
        """{step, **extra, loss (mean over the steps since the last row), lr, images_per_s}; resets."""
        elapsed = time.perf_counter() - self.started
        row = {
            "step": step,
            **extra,
            "loss": self.total.item() / (step - self.logged_at),
            "lr": optimizer.param_groups[-1]["lr"],
            "images_per_s": self.images * world / elapsed,
        }
        self.total.zero_()
        self.images, self.started, self.logged_at = 0, time.perf_counter(), step
        return row


class StepEnd:
    """The end of a training step in a trainer that evaluates (fine-tuning, segmentation): the
    optimizer step (`update`); rank 0 logs the loss every `log_every` steps and at the last
    (`log`); then (`checkpoint`) every rank's random states are taken when saving (before
    evaluation draws from them), rank 0 evaluates when asked, logging the result's `keys` as eval_*
    and keeping best.pt while `metric` improves, the checkpoint is written and the ranks meet.
    `best` and `last` (the last evaluation) are what a checkpoint records; they start from the
    resumed ones."""

    def __init__(self, run: Run, meter: LossMeter, optimizer, bar, total: int, log_every: int, metric: str,
                 keys: tuple[str, ...], best: float, last: dict):  # fmt: skip
        self.run, self.meter, self.optimizer, self.bar = run, meter, optimizer, bar
        self.total, self.log_every, self.metric, self.keys = total, log_every, metric, keys
        self.best, self.last = best, last

    def update(self, loss: torch.Tensor, images: int) -> None:
        """The optimizer step on `loss` (backward, step, gradients cleared), counted for the next row."""
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.meter.add(loss, images)
        self.bar.update(1)

    def log(self, step: int, **extra: Any) -> None:
        if self.run.dist.main and (step % self.log_every == 0 or step == self.total):
            row = self.meter.row(step, self.optimizer, self.run.dist.world, **extra)
            self.run.log(row)
            self.bar.set_postfix(loss=f"{row['loss']:.3f}")

    def checkpoint(self, step: int, evaluating: bool, saving: bool, evaluate, save, **extra: Any) -> None:
        """`evaluate()` gives the result; `save(path, rng)` writes a checkpoint. When a stop signal
        came (on any rank), the checkpoint is written at this step (after an evaluation due here,
        as an uninterrupted run would make it) and Preempted is raised."""
        stopping = self.run.stopping()
        saving = saving or stopping
        rng = self.run.dist.rng_states(self.run.device) if saving else []  # every rank's
        if evaluating:  # rank 0 evaluates; an unreadable validation set stops every rank, together
            self.last = self.run.dist.on_main(evaluate)
        if evaluating and self.run.dist.main:
            self.run.log({"step": step, **extra, **{f"eval_{k}": self.last[k] for k in self.keys}})
            if self.last[self.metric] > self.best:
                self.best = self.last[self.metric]
                save(self.run.out / "best.pt", rng)
        if saving:
            save(self.run.checkpoint, rng)
            self.run.dist.barrier()
        if stopping and step < self.total:  # at the last step the run is done: it ends as usual
            self.bar.close()
            self.run.preempted(step)


def changed_keys(theirs: Any, ours: Any) -> list[str]:
    """The dotted keys where two JSON-like values differ (tuples and lists alike)."""
    theirs, ours = json.loads(json.dumps(theirs)), json.loads(json.dumps(ours))
    return [key for key, _, _ in differences(theirs, ours)]


class Run:
    """One training run of `kind` ("pretrain", "finetune", ...) in the folder `out`, under
    torchrun or alone; `cfg` is the trainer's config dataclass (its `device`,
    `dist_timeout_minutes` and FREE_ON_RESUME are used)."""

    def __init__(self, out: Path, cfg: Any, kind: str, progress: bool = True):
        require_dali()  # every trainer reads its images through DALI: refuse before any work
        self.cfg, self.kind, self.progress = cfg, kind, progress
        self.dist = init_dist(timeout_minutes=cfg.dist_timeout_minutes)
        self.device = self.dist.device(cfg.device)
        self.device_id = dali_device_id(self.device)  # for DALI pipelines: decode on this GPU
        self.out = Path(out)
        self.checkpoint = self.out / "checkpoint.pt"
        self.fields: dict[str, Any] = {}
        self.board = None  # TensorBoard's writer, when the config asks for it (`start`)
        self.origins: dict[str, str] = {}  # dotted key -> where its value came from, for config.toml
        if getattr(cfg, "tensorboard", False):
            tensorboard_writer(None, 0)  # every rank refuses a missing package at once, before any work
        # SIGTERM and the config's stop_signal: stop at a step every rank agrees on, saved (`stopping`)
        self.stops = StopSignals(getattr(cfg, "stop_signal", "SIGUSR1")).install()
        self._watched: list[Inputs] = []  # this rank's training inputs (`watch_inputs`)

    @property
    def main(self) -> bool:
        return self.dist.main

    def skipped_log(self, resume: bool) -> SkippedLog:
        """The run folder's skipped.jsonl: the inputs that could not be read, and why; a fresh run
        (rank 0) starts it empty, a resumed one adds to it."""
        fresh = self.main and not (resume and self.checkpoint.exists())
        return SkippedLog(self.out / "skipped.jsonl", fresh)

    def stopping(self) -> bool:
        """Whether the run stops after this step: a stop signal came to some rank (every rank must
        ask at the same step; one small all-reduce under torchrun)."""
        return self.dist.any(self.stops.received is not None)

    def watch_inputs(self, inputs: Inputs) -> Inputs:
        """`inputs` of this rank's training images. Under torchrun a rank whose share passes
        max_skipped_fraction (or that meets a batch of none) must not stop alone, while the others
        wait in the next all-reduce until the distributed timeout: it notes its sentence
        (`Inputs.defer`), and `check_inputs` after each batch stops every rank there."""
        inputs.defer = self.dist.world > 1
        self._watched.append(inputs)
        return inputs

    def check_inputs(self) -> None:
        """After taking a training batch, before using it (every rank, under torchrun: one small
        all-reduce): a ValueError on every rank when some rank's watched inputs noted a stop; that
        rank's sentence, and on the others one naming it."""
        if self.dist.world == 1:
            return
        sentence = next((inputs.stop for inputs in self._watched if inputs.stop), None)
        rank = self.dist.first(sentence is not None)
        if rank is not None:
            self.dist.leave()
            raise ValueError(
                sentence
                or f"rank {rank} stopped the run: too many of its training images could not be read (its "
                "error says which; every rank stopped at this step)."
            )

    def preempted(self, step: int, saved: bool = True) -> None:
        """After the checkpoint at `step` is written (every rank): the marker (rank 0), the run
        closed, and Preempted raised with the sentence the command prints. `saved=False`: a run
        that writes no checkpoint (a benchmark) stops there and says so."""
        signal = self.stops.received or "a stop signal on another rank"
        self.close()
        if not saved:
            raise Preempted(f"stopped by {signal} at step {step}; this run writes no checkpoint.")
        if self.main:
            write_marker(self.out, signal=signal, step=step, checkpoint=str(self.checkpoint))
        raise Preempted(
            f"stopped by {signal} at step {step}; {self.checkpoint} holds that step: run the same command again "
            "to resume."
        )

    def autocast(self):
        """bf16 autocast on a GPU; nothing on the CPU."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def identity(self, **fields: Any) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed: the config (less the keys
        the config class frees on resume), `fields`, and the world size. Saved with every checkpoint."""
        self.fields = {
            "config": resume_fields(type(self.cfg), to_dict(self.cfg)),
            **fields,
            "world_size": self.dist.world,
        }
        return self.fields

    def resume(
        self,
        resume: bool,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        total: int | None,
        elastic: tuple[str, ...] = (),
    ) -> dict | None:
        """The checkpoint's meta after loading it into `model` and `optimizer` and restoring every
        rank's random state, when the run resumes (rank 0 decides); None when it starts afresh.
        `elastic`: identity keys (dotted, as `changed_keys` names them) that may differ, such as
        "world_size" for a trainer that re-shards its data; a rank the checkpoint has no random
        state for gets one seeded by (config seed, step, rank)."""
        before = previous(self.checkpoint)
        if resume and self.main and not self.checkpoint.exists() and before.exists():
            # stopped between keeping the previous checkpoint and writing the next: the previous is the newest
            os.replace(before, self.checkpoint)
            if before.with_suffix(".json").exists():
                os.replace(before.with_suffix(".json"), self.checkpoint.with_suffix(".json"))
        self.dist.barrier()
        if not self.dist.resume_from(self.checkpoint, resume):
            return None
        try:
            state, meta = load_checkpoint(self.checkpoint)
        except CheckpointError as error:
            if not before.exists():
                raise
            state, meta = load_checkpoint(before)  # the one before it; if it is damaged too, that is said
            if self.main:
                print(
                    f"{self.checkpoint} cannot be used ({error}); resuming from the previous checkpoint, {before}, "
                    f"at step {meta['step']}",
                    flush=True,
                )
        theirs = {key: meta.get(key) for key in self.fields}
        theirs["config"] = resume_fields(type(self.cfg), theirs["config"])
        changed = [key for key in changed_keys(theirs, self.fields) if key not in elastic]
        if changed:
            raise CheckpointError(
                f"{self.checkpoint} is from another run ({', '.join(changed[:5])} differ): use another --out, or "
                "--no-resume to start over here."
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        fallback = (getattr(self.cfg, "seed", 0), meta["step"])
        self.dist.restore_rng(state["rng"], self.device, fallback)
        self.dist.check_same(f"{self.checkpoint} at step", meta["step"])
        if self.main:
            of = f" of {total}" if total is not None else ""
            print(f"resuming from {self.checkpoint} at step {meta['step']}{of}", flush=True)
        return meta

    def start(self, step: int) -> None:
        """Write the run folder's config.toml, and start metrics.jsonl (at step 0) or drop its rows
        past `step` (on resume)."""
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            clear_marker(self.out)  # a stopped attempt's, now resumed
            text = to_toml(self.cfg, self.origins)
            try:
                (self.out / "config.toml").write_text(text)
                if step == 0:
                    (self.out / "metrics.jsonl").write_text("")
                else:
                    truncate_metrics(self.out / "metrics.jsonl", step)
            except OSError as error:
                if not out_of_space(error):
                    raise
                raise DiskFull(no_room(self.out, "the run's config.toml and metrics.jsonl", len(text) + 4096)) from None
            if getattr(self.cfg, "tensorboard", False):
                with self._board_room(4096):
                    self.board = tensorboard_writer(self.out / "tensorboard", step)
                quiet_full_disk_in_threads()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` under DistributedDataParallel when there are several ranks, else itself."""
        if self.dist.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def bar(self, total: int, initial: int):
        return progress_bar(
            total=total, initial=initial, disable=not (self.progress and self.main), unit="step", desc=self.kind
        )

    def log(self, row: dict) -> None:
        """Append one row to metrics.jsonl (rank 0), and its numbers to TensorBoard at its step."""
        if self.main:
            line = json.dumps(row) + "\n"
            try:
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(line)
            except OSError as error:  # a row cut in half is dropped on resume (`truncate_metrics`)
                if not out_of_space(error):
                    raise
                raise DiskFull(no_room(self.out / "metrics.jsonl", "a metrics row", len(line))) from None
            if self.board is not None:
                numbers = {
                    key: value
                    for key, value in row.items()
                    if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
                }
                with self._board_room(64 * len(numbers)):
                    for key, value in numbers.items():
                        self.board.add_scalar(key, value, row["step"])

    @contextlib.contextmanager
    def _board_room(self, needed: int):
        """TensorBoard's writes (its events are written by a thread of its own, whose error shows
        at the next call): a full disk stops the run in one sentence; the events written before stay
        readable, and a resumed run purges any past its checkpoint."""
        try:
            yield
        except OSError as error:
            if not out_of_space(error):
                raise
            self.board = None  # its writer thread has stopped: nothing more to flush or close
            raise DiskFull(no_room(self.out / "tensorboard", "TensorBoard's event file", needed)) from None

    def picture(self, tag: str, image, step: int) -> None:
        """An HWC uint8 picture to TensorBoard at `step` (rank 0; nothing without TensorBoard)."""
        if self.main and self.board is not None:
            with self._board_room(image.nbytes):
                self.board.add_image(tag, image, step, dataformats="HWC")

    def save(self, path: Path, model: torch.nn.Module, optimizer, rng: list[dict], meta: dict) -> None:
        """Write a checkpoint (rank 0): model and optimizer state, every rank's `rng`, and `meta`
        with the run's kind and identity."""
        if self.main:
            if self.board is not None:  # the event files hold every row up to the checkpoint, whatever comes next
                with self._board_room(4096):
                    self.board.flush()
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng}
            # the run's checkpoint keeps the one before it (a damaged newest one falls back to it)
            save_checkpoint(
                path, state, {"kind": self.kind, **meta, **self.fields}, keep_previous=path == self.checkpoint
            )

    def close(self) -> None:
        self.stops.uninstall()
        if self.board is not None:
            board, self.board = self.board, None
            with self._board_room(4096):
                board.close()
        self.dist.close()


def quiet_full_disk_in_threads() -> None:
    """TensorBoard's writer thread ends on a full disk with a traceback of its own, and the run's
    next TensorBoard call raises the same error, which `Run._board_room` turns into one sentence:
    the thread's traceback is left unprinted (any other error of any thread still prints)."""
    hook = threading.excepthook
    if getattr(hook, "quiet_full_disk", False):
        return

    def quiet(args) -> None:
        if not out_of_space(args.exc_value):
            hook(args)

    quiet.quiet_full_disk = True
    threading.excepthook = quiet


def tensorboard_writer(folder: Path | None, step: int):
    """A TensorBoard writer appending to `folder`; a run resumed at `step` purges what an earlier
    attempt wrote past that step (TensorBoard's purge_step), so no step shows twice. With
    no folder, only checks that the package is there."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "tensorboard = true needs the tensorboard package: pip install 'beit[tensorboard]', or drop the setting."
        ) from None
    if folder is None:
        return None
    # TensorBoard reads a folder's event files in name order, and a name starts with its creation
    # second: a resumed run's file must not share that second with an earlier attempt's, or it may
    # be read first (and the purge below would hide nothing, the older rows shown after the newer)
    seconds = [
        int(part) for f in Path(folder).glob("events.out.tfevents.*") if (part := f.name.split(".")[3]).isdigit()
    ]
    deadline = time.monotonic() + 2
    while seconds and max(seconds) >= int(time.time()) and time.monotonic() < deadline:
        time.sleep(0.05)
    # the rows kept on resume are those of steps <= `step` (`truncate_metrics`): purge from step + 1
    return SummaryWriter(str(folder), purge_step=step + 1 if step else None)


def warmup_epochs_of(cfg: Any, released: tuple[int, int]) -> dict[str, str]:
    """Fill `cfg.warmup_epochs` when left -1 with the released share of the run (`released` =
    (warm-up epochs, epochs) of the released recipe), or refuse in one sentence a warm-up longer
    than the run; returns where a filled value came from (for config.toml)."""
    if cfg.warmup_epochs < 0:
        cfg.warmup_epochs = cfg.epochs * released[0] / released[1]
        return {
            "warmup_epochs": f"the released share of the run's {cfg.epochs} epochs ({released[0]} of {released[1]})"
        }
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(
            f"warmup_epochs {cfg.warmup_epochs:g} is longer than the run (epochs {cfg.epochs}): the learning rate "
            "would never leave warm-up; lower it, or leave it -1 for the released share of the run."
        )
    return {}
