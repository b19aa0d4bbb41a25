"""Semantic segmentation batches: a `SegmentationSource` (`segment/datasets.py`) decoded by DALI (on
the GPU when there is one) and turned into training or evaluation views by mmseg's augmentation
(`segment/augment.py`), in torch where the decoded image is.

    train = read_segmentation(DATA, "train")            # the layout detected, sizes checked
    data = SegmentationData(train, crop=512, batch_size=16, train=True, seed=0)
    pixels, labels = data.batch(step)                    # [B, 3, 512, 512] normalised, [B, 512, 512] int64
    val = SegmentationData(read_segmentation(DATA, "val"), crop=512, batch_size=4, train=False)
    for key, pixels, labels in val.images():             # [1, 3, h, w] at the base scale, [H, W] as stored
        ...

Every random draw comes from np.random.default_rng([seed, epoch, image index]): any rank, restart
or resumed run draws the same views of an image. What was listed, read and skipped (at listing or
when decoded) is counted in `inputs` (`beit.shared.inputs`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from beit.shared.decode import ImageBatches, as_tensor, pipeline_builder, require_dali
from beit.shared.inputs import MAX_SKIPPED_FRACTION, Inputs, SkippedLog
from beit.shared.prefetch import ahead, prefetch
from beit.train.segment.augment import eval_view, train_view
from beit.train.segment.datasets import SegmentationSource


def decode_builder(threads: int = 0):
    """Pipeline factory for `ImageBatches`: decoded RGB HWC uint8, padded with zeros to the
    batch's largest height and width so that images of any size make one batch."""
    require_dali()
    from nvidia.dali import fn

    return pipeline_builder(lambda images, device_id: fn.pad(images, axes=(0, 1), fill_value=0), threads)


def segmentation_inputs(
    source: SegmentationSource,
    limit: float = MAX_SKIPPED_FRACTION,
    log: SkippedLog | None = None,
    split: str = "",
    setting: str = "--set max_skipped_fraction=F",
) -> Inputs:
    """The `Inputs` of a split: its images unreadable at listing counted, the skipped into `log`."""
    names = [str(path) for path in source.images]
    return Inputs(str(source.root), len(names), names.__getitem__, limit, setting, split, log, source.unreadable)


class SegmentationData:
    """Training batches of `source` in a deterministic per-epoch order, sharded by rank (whole
    batches only); or, for evaluation, this rank's images one at a time (`images`)."""

    def __init__(
        self,
        source: SegmentationSource,
        crop: int,
        batch_size: int,
        train: bool,
        seed: int = 0,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        threads: int = 0,
        rank: int = 0,
        world: int = 1,
        device_id: int | None = None,
        photometric: bool = True,
        inputs: Inputs | None = None,
    ):
        self.source, self.crop, self.batch_size, self.train = source, crop, batch_size, train
        self.seed, self.scale, self.ratio_range, self.cat_max_ratio = (
            seed,
            tuple(scale),
            tuple(ratio_range),
            cat_max_ratio,
        )
        self.rank, self.world, self.photometric = rank, world, photometric
        self.batches = ImageBatches(decode_builder(threads), batch_size, device_id, seed)  # .failed: files set aside
        self.inputs = inputs or segmentation_inputs(source)
        self.inputs.check()  # images unreadable already at listing: a wrong path stops here
        self._order: tuple[int, np.ndarray] = (-1, np.arange(0))
        self._stream = None
        n = len(source.images)
        # evaluation: a step is one of this rank's images
        self.steps_per_epoch = n // (batch_size * world) if train else len(range(rank, n, world))
        if train and self.steps_per_epoch == 0:
            raise ValueError(
                f"{source.root} has {n} training images, fewer than one batch of {batch_size} x {world}: "
                "lower --batch-size."
            )

    def indices(self, step: int) -> np.ndarray:
        """The source indices of this rank's share of training batch `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:  # drawn once per epoch, not per batch
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.source.images)))
        start = within * self.batch_size * self.world + self.rank * self.batch_size
        return self._order[1][start : start + self.batch_size]

    def _decoded(self, indices: np.ndarray) -> list[tuple[int, torch.Tensor]]:
        """(index, image [H, W, 3] uint8) of each of `indices` that decodes, on DALI's device."""
        files = [self.source.images[i] for i in indices]
        outputs, kept = self.batches.run(files)
        self.inputs.account(indices, files, kept, self.batches.failed)  # a file that fails is skipped, not fatal
        if not kept:
            return []
        padded = as_tensor(outputs[0])
        out = []
        for position, k in enumerate(kept):
            height, width = self.source.sizes[indices[k]]
            out.append((int(indices[k]), padded[position, :height, :width]))
        return out

    @contextlib.contextmanager
    def _side_stream(self, device: torch.device):
        """On a GPU, this thread's augmentation kernels run on a side stream it waits for, so the
        trainer's stream never does (as `ImageBatches` copies its outputs)."""
        if device.type != "cuda":
            yield
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self._stream):
            yield
        self._stream.synchronize()

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch `step`: (pixels [B, 3, crop, crop] float32 on DALI's device, labels
        [B, crop, crop] int64 on the CPU, page-locked for a GPU trainer). B is less than batch_size
        only when files fail to decode (`inputs.skipped`); a batch of none stops the run."""
        chosen = self.indices(step)
        epoch = step // self.steps_per_epoch
        decoded = self._decoded(chosen)
        pin = self.batches.device_id is not None
        if not decoded:  # stops the run (under torchrun, every rank at `Run.check_inputs`, before it is used)
            self.inputs.refuse_empty_batch(len(chosen))
            return torch.zeros(0, 3, self.crop, self.crop), torch.zeros(0, self.crop, self.crop, dtype=torch.int64)
        pixels, labels = [], []
        device = decoded[0][1].device
        with self._side_stream(device):
            for index, image in decoded:
                rng = np.random.default_rng([self.seed, epoch, index])
                mask = self.source.load_mask(self.source.masks[index])
                view, label = train_view(
                    image, mask, rng, self.crop, self.scale, self.ratio_range, self.cat_max_ratio,
                    self.source.ignore_index, self.photometric,
                )  # fmt: skip
                pixels.append(view)
                labels.append(label)
            stacked = torch.stack(pixels)
        if device.type == "cuda":
            stacked.record_stream(torch.cuda.default_stream(device))
        return stacked, as_tensor(np.stack(labels).astype(np.int64), pin)

    def stream(self, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches from `start_step` on, prepared ahead in a thread (a resumed run draws
        what an uninterrupted one would have: the draws are keyed by seed, epoch and image)."""
        return prefetch(self.batch, start_step)

    def _evaluated(self, indices: np.ndarray) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        out = []
        for index, image in self._decoded(indices):
            with self._side_stream(image.device):
                pixels = eval_view(image, self.scale)
            if pixels.is_cuda:
                pixels.record_stream(torch.cuda.default_stream(pixels.device))
            labels = torch.from_numpy(self.source.load_mask(self.source.masks[index]).astype(np.int64))
            out.append((self.source.keys[index], pixels, labels))
        return out

    def images(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """This rank's evaluation images (every `world`-th from `rank`), one at a time, decoded
        ahead in a thread: (key, pixels [1, 3, h, w] float32 resized to the base scale and
        normalised, labels [H, W] int64 at the original size). Failed files are left out
        (`batches.failed`)."""
        shard = np.arange(self.rank, len(self.source.images), self.world)
        chunks = [shard[i : i + self.batch_size] for i in range(0, len(shard), self.batch_size)]
        for chunk in ahead(chunks, self._evaluated):
            yield from chunk
