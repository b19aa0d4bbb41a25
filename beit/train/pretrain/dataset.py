"""A token store as a PyTorch dataset: `MaskedImageDataset` yields what `beit pretrain` trains on
(a view's pixels, its cached token grid and a BEiT mask), one sample at a time, for a user's own
`torch.utils.data.DataLoader`, training loop or Hugging Face model.

It follows the trainer's plan (`data.SamplePlan`): epoch e visits the store's tokenized images in
the permutation drawn from (seed, e), shows each image the view the trainer shows it in that epoch
(its V cached views cycling in an order drawn afresh every V epochs) and masks it with the mask
keyed by (seed, e, image). Ranks and data loader workers split that order (rank r takes positions
r, r + W, ...; within a rank, worker k of K takes every K-th of the rank's), so every sample
comes once per epoch, whatever the number of ranks or workers. With one rank and no workers the
order is the trainer's own. `loader(device="cuda")` gives the trainer's fast path instead: the
same samples cut into the trainer's batches, rendered by DALI on the GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from beit.shared.decode import ImageBatches
from beit.shared.store import DONE, StoreError, TokenStore
from beit.shared.views import render_builder
from beit.train.pretrain.data import PretrainData, SamplePlan, Sampling, refuse_unreadable

_INHERITED: list = []  # DALI pipelines a forked worker got from its parent: kept, never shut down


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: torch.distributed's when it is initialised, else
    torchrun's environment (RANK, WORLD_SIZE), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class MaskedImageDataset(torch.utils.data.IterableDataset):
    """The samples of the token store at `store` (a path or an fsspec URL) for masked image
    modeling, as `beit pretrain` draws them from `seed`. Each sample is a dict:

        pixel_values     float32 [3, S, S]   the view as tokenized (crop, flip, colour jitter),
                                             rendered at the store's image size S, ImageNet-normalised
        tokens           int64 [gh * gw]     the view's cached token ids, row-major (the targets)
        bool_masked_pos  bool [gh * gw]      True where the patch is masked (BEiT's blockwise masks,
                                             or uniformly random ones with mask="random")
        image            int64 []            the image's index in the store
        view             int64 []            which of its views

    `set_epoch(e)` before iterating chooses the epoch (as with `DistributedSampler`); `len()` is
    this rank's samples per epoch. `mask_count` and `min_block` (0: BEiT's 75 and 16 of a 14x14
    grid, scaled to the store's grid), `views` (0: all the store's views; k: the first k) and
    `source_root` (the source images moved elsewhere) are as in `beit pretrain`. `rank` and
    `world` default to torch.distributed's (or torchrun's environment); the last
    len(images) % world images of each epoch's order are left out so that every rank gets as
    many samples. Pixels are rendered `chunk` images at a time by a DALI CPU pipeline built in
    each worker process, with `threads` threads each (0: its share of the cores).
    """

    def __init__(
        self,
        store: str | Path,
        seed: int = 0,
        mask: str = "block",
        mask_count: int = 0,
        min_block: int = 0,
        views: int = 0,
        rank: int | None = None,
        world: int | None = None,
        source_root: str | Path = "",
        chunk: int = 16,
        threads: int = 1,
    ):
        if mask not in ("block", "random"):
            raise ValueError(f"mask {mask!r} is not one of block, random.")
        opened = TokenStore.open(store)
        if views > opened.views_per_image:
            raise StoreError(
                f"views = {views} is more than the {opened.views_per_image} views per image {store} holds."
            )
        found_rank, found_world = _rank_and_world()
        self.rank = found_rank if rank is None else rank
        self.world = found_world if world is None else world
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not one of the {self.world} ranks.")
        self.location, self.source_root = str(store), str(source_root)
        self.done = np.flatnonzero(opened.status() == DONE)
        self.views = views or opened.views_per_image
        self.grid, self.image_size = opened.grid, opened.image_size
        self.sampling = Sampling(1, seed=seed, mask=mask, mask_count=mask_count, min_block=min_block)
        self.plan = SamplePlan(self.done, self.views, self.grid, self.sampling)
        self.epoch, self.chunk, self.threads = 0, chunk, threads
        self._store: TokenStore | None = None  # opened again in each worker process
        self._renders: ImageBatches | None = None
        self._owner = os.getpid()  # the process that built them

    def set_epoch(self, epoch: int) -> None:
        """Draw the order, views and masks of `epoch` (call it before each epoch's iteration)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.done) // self.world

    def __getstate__(self) -> dict:  # a worker started by spawn opens the store itself
        return {**self.__dict__, "_store": None, "_renders": None}

    def indices(self, epoch: int | None = None, worker: int = 0, workers: int = 1) -> np.ndarray:
        """int64: the store indices this rank's `worker` (of `workers`) yields in `epoch`, in order."""
        order = self.plan.epoch_order(self.epoch if epoch is None else epoch)
        kept = len(order) - len(order) % self.world
        return order[self.rank : kept : self.world][worker::workers].astype(np.int64)

    def _opened(self) -> TokenStore:
        if self._owner != os.getpid():  # a forked data loader worker: the parent's DALI threads are not here,
            _INHERITED.append(self._renders)  # and shutting its pipeline down would wait for them for ever
            self._store, self._renders, self._owner = None, None, os.getpid()
        if self._store is None:
            self._store = TokenStore.open(self.location)
            if self.source_root:
                self._store.use_source_root(self.source_root)
            render = render_builder(1, self.image_size, "patches", self.threads)
            self._renders = ImageBatches(render, self.chunk, None, self.sampling.seed)
        return self._store

    def samples(self, images: np.ndarray, epoch: int) -> list[dict[str, torch.Tensor]]:
        """The samples of store indices `images` in `epoch` (rendered together)."""
        store, images = self._opened(), np.asarray(images, dtype=np.int64)
        order = np.argsort(images)  # zarr reads sorted indices chunk by chunk
        views = self.plan.views_of(images, epoch)
        masks = torch.from_numpy(self.plan.masks_of(images, epoch))
        tokens, params = np.empty((len(images), *self.grid), np.int64), np.empty((len(images), 8), np.float32)
        tokens[order] = store.tokens(images[order])[np.arange(len(images)), views[order]]
        params[order] = store.view_params(images[order])[np.arange(len(images)), views[order]]
        items = store.items(images)
        outputs, kept = self._renders.run(items, {"view0": list(params)})
        refuse_unreadable(store, items, images, kept)
        pixels = torch.from_numpy(np.ascontiguousarray(outputs[0]))
        tokens = torch.from_numpy(tokens.reshape(len(images), -1))
        return [
            {
                "pixel_values": pixels[i],
                "tokens": tokens[i],
                "bool_masked_pos": masks[i],
                "image": torch.tensor(images[i]),
                "view": torch.tensor(int(views[i])),
            }
            for i in range(len(images))
        ]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        mine = self.indices(epoch, worker, workers)
        for start in range(0, len(mine), self.chunk):
            yield from self.samples(mine[start : start + self.chunk], epoch)

    def loader(
        self,
        batch_size: int,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
        trainer_path: bool | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of this epoch: dicts of the sample keys, each stacked to [B, ...] on `device`.
        On a CUDA device (or with `trainer_path`), the trainer's own path: DALI renders whole
        batches (on the GPU when there is one), `batch_size` images per rank cut from the order
        as `beit pretrain` cuts them (rank r takes the r-th B of each global batch of B x W; the
        tail that fills no global batch is left out). Otherwise a `DataLoader` over this dataset
        with `num_workers` workers."""
        device = torch.device(device)
        if trainer_path is None:
            trainer_path = device.type == "cuda"
        if not trainer_path:
            loader = torch.utils.data.DataLoader(self, batch_size=batch_size, num_workers=num_workers)
            for batch in loader:
                yield {name: value.to(device, non_blocking=True) for name, value in batch.items()}
            return
        yield from self._trainer_batches(batch_size, device)

    def _trainer_batches(self, batch_size: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        sampling = replace(self.sampling, batch_size=batch_size, rank=self.rank, world=self.world)
        device_id = (device.index or 0) if device.type == "cuda" else None
        data = PretrainData(
            self.location, sampling, threads=self.threads, device_id=device_id,
            views=self.views, source_root=self.source_root,
        )  # fmt: skip
        data.restart_at((self.epoch, 0))  # micro-batch 0 is the first of this epoch
        for step in range(data.plan.steps_until(self.epoch + 1)):
            batch = data.batch(step)
            yield {
                "pixel_values": batch.pixels.to(device, non_blocking=True),
                "tokens": batch.tokens.to(device, non_blocking=True),
                "bool_masked_pos": batch.mask.to(device, non_blocking=True),
                "image": torch.from_numpy(batch.images).to(device),
                "view": torch.from_numpy(data.plan.views_of(batch.images, self.epoch)).to(device),
            }
