"""Pre-training batches from a token store: the pixels of recorded views, their cached tokens,
and blockwise masks.

The plan is a pure function of (seed, epoch, step), so any rank and any restart gets the same
samples. Epoch e visits the store's done images (never the failed ones) in a permutation drawn
from (seed, e); each image shows one of its V views, cycling through all V in an order drawn
afresh every V epochs. Global step s of an epoch takes positions [s*B*W, (s+1)*B*W) of that
order (B per-rank batch, W ranks; the tail that does not fill a global batch is left for the
next epoch's fresh order); rank r takes the r-th B of them. A run resumed with another global
batch (world size, batch size or accumulation) re-cuts the plan from the (epoch, position) the
checkpoint reached: the epoch in progress goes on from there, no image repeated or skipped.
Views and masks are drawn from counter keys (seed, image, ...), a whole batch at once, so an
image's view and mask in an epoch do not depend on the batch, the rank or the number of ranks.
With `fresh` (online targets), epoch e shows each image's view e instead, drawn as stage 1 draws
views (the first V are the cached ones; later ones are new).

Pixels are rendered by `beit.shared.views.render` at the store's patch size (bicubic, ImageNet
normalisation) from what `TokenStore.items` gives (the store's embedded copies when it holds
them, else the original files: source_root + key); with `twin`, the tokenizer-size view is rendered
too (for online targets and for checking the store). Tokens, view parameters, status, image sizes
and keys are memory-mapped from the node's copy of the store (`TokenStore.node_copy`), shared by
the node's ranks; embedded images are read image by image. A background thread prepares the next
batches while the model trains.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from beit.shared.counter import counter_key, counter_uniforms
from beit.shared.decode import ImageBatches, as_tensor
from beit.shared.prefetch import prefetch
from beit.shared.store import DONE, StoreError, TokenStore
from beit.shared.views import draw_views, render_builder, shape_builder
from beit.train.pretrain.masking import block_masks, masked_positions, random_masks


@dataclass
class Batch:
    pixels: torch.Tensor  # [B, 3, S, S] float32, ImageNet-normalised
    tokens: torch.Tensor  # [B, gh * gw] int64, the cached targets
    mask: torch.Tensor  # [B, gh * gw] bool, True = masked
    positions: torch.Tensor  # [B, K] int64: each image's masked patches, padded to the plan's K (`masked_positions`)
    valid: torch.Tensor  # [B, K] bool: False on the padding
    images: np.ndarray  # [B] store indices
    twin: torch.Tensor | None = None  # [B, 3, s, s] in [0, 1], the tokenizer-size view


@dataclass(frozen=True)
class Sampling:
    """How a run draws batches from a store: `batch_size` images per rank and step for `world`
    ranks (this one `rank`), orders, views and masks from `seed`; masks of kind `mask` ("block":
    BEiT's blockwise masks, "random": uniformly chosen patches) of `mask_count` patches in blocks of
    at least `min_block` (0 for either: BEiT's 75 and 16 of a 14x14 grid, scaled to the grid)."""

    batch_size: int
    seed: int = 0
    rank: int = 0
    world: int = 1
    mask: str = "block"
    mask_count: int = 0
    min_block: int = 0


class SamplePlan:
    """Which images, views and masks global micro-batch `step` gives this rank: a pure function of
    (seed, epoch, step). `done` are the store indices that may be sampled. `origin` = (epoch,
    position): micro-batch 0 starts there in that epoch's order (a run resumed on another world
    size or batch continues the epoch in progress from where the last one stopped; (0, 0) for a
    run from the start)."""

    def __init__(self, done: np.ndarray, views: int, grid: tuple[int, int], sampling: Sampling,
                 origin: tuple[int, int] = (0, 0)):  # fmt: skip
        self.done = np.asarray(done, dtype=np.int32)  # store indices (< 2**31): 4 bytes an image, per rank
        self.views, self.grid, self.sampling = views, grid, sampling
        patches = grid[0] * grid[1]
        # 0: BEiT's 75 patches and 16-patch minimum blocks of a 14x14 grid, scaled to this grid
        self.mask_count = sampling.mask_count or max(1, round(75 * patches / 196))
        self.min_block = sampling.min_block or max(1, round(16 * patches / 196))
        self.global_batch = self.batch_size * self.world
        self.steps_per_epoch = len(done) // self.global_batch
        self.origin = (int(origin[0]), int(origin[1]))
        self.first_steps = (len(done) - self.origin[1]) // self.global_batch  # what is left of the origin's epoch
        self._order: tuple[int, np.ndarray] = (-1, done)

    @property
    def batch_size(self) -> int:
        return self.sampling.batch_size

    @property
    def seed(self) -> int:
        return self.sampling.seed

    @property
    def rank(self) -> int:
        return self.sampling.rank

    @property
    def world(self) -> int:
        return self.sampling.world

    def resharded(self, batch_size: int, rank: int, world: int, origin: tuple[int, int]) -> SamplePlan:
        """The same samples cut into batches of `batch_size` for `world` ranks, from `origin`."""
        sampling = replace(self.sampling, batch_size=batch_size, rank=rank, world=world)
        return SamplePlan(self.done, self.views, self.grid, sampling, origin)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, position in that epoch's order) where global micro-batch `step` starts. An
        epoch's tail that does not fill a global batch is left for the next epoch's fresh order."""
        if step < self.first_steps:
            return self.origin[0], self.origin[1] + step * self.global_batch
        epoch, within = divmod(step - self.first_steps, self.steps_per_epoch)
        return self.origin[0] + 1 + epoch, within * self.global_batch

    def epoch_at(self, step: int) -> float:
        """Epochs done before micro-batch `step`, counted in each epoch's whole global batches."""
        epoch, position = self.position(step)
        return epoch + position / (self.steps_per_epoch * self.global_batch)

    def steps_until(self, epochs: int) -> int:
        """Micro-batches from the origin to the end of epoch `epochs` - 1."""
        return max(0, self.first_steps + (epochs - self.origin[0] - 1) * self.steps_per_epoch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._order[0] != epoch:  # drawn once per epoch, not per batch: 1.28M images take tens of ms
            order = np.random.default_rng([self.seed, epoch]).permutation(np.arange(len(self.done), dtype=np.int32))
            self._order = (epoch, self.done[order])  # the permutation of range(n), drawn in int32
        return self._order[1]

    def views_of(self, images: np.ndarray, epoch: int) -> np.ndarray:
        """Each image's view in `epoch`: its V views in an order drawn afresh every V epochs, keyed
        by (seed, image, cycle)."""
        cycle, turn = divmod(epoch, self.views)
        order = counter_uniforms(counter_key(self.seed, np.asarray(images), cycle, 1), self.views).argsort(1)
        return order[:, turn]

    def at(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(this rank's store indices, their views, their masks [B, gh * gw]) for global micro-batch `step`."""
        epoch, start = self.position(step)
        start += self.rank * self.batch_size
        images = self.epoch_order(epoch)[start : start + self.batch_size].astype(np.int64)
        return images, self.views_of(images, epoch), self.masks_of(images, epoch)

    def masks_of(self, images: np.ndarray, epoch: int) -> np.ndarray:
        """bool [len(images), gh * gw] (True = masked): each image's mask in `epoch`, keyed by
        (seed, epoch, image), whatever batch, rank or data loader worker draws it."""
        keys = counter_key(self.seed, epoch, np.asarray(images, dtype=np.int64), 2)
        if self.sampling.mask == "random":
            masks = random_masks(keys, self.grid, self.mask_count)
        else:
            masks = block_masks(keys, self.grid, self.mask_count, min_block=self.min_block)
        return masks.reshape(len(images), -1)


def refuse_unreadable(store: TokenStore, items: list, images: np.ndarray, kept: list[int]) -> None:
    """Stop with one sentence when an image the store tokenized (`images`, read as `items`) could
    not be read now (`kept` are those that were)."""
    if len(kept) == len(images):
        return
    lost = [j for j in range(len(images)) if j not in kept]
    bad = [str(items[j]) for j in lost if isinstance(items[j], Path)]
    bad = bad or store.keys(np.sort(np.asarray(images)[lost]))
    raise StoreError(
        f"could not read {', '.join(bad[:3])} although the store tokenized it: the source changed "
        "since tokenization; restore it, or tokenize again with --embed-images."
    )


class PretrainData:
    """This rank's pre-training batches (`batch(step)`, `stream(start)`) from the store at `location`,
    drawn as `sampling` says; see the module's text for `twin`, `fresh`, `views` and the rest."""

    def __init__(
        self,
        location: str,
        sampling: Sampling,
        twin: bool = False,
        threads: int = 0,
        device_id: int | None = None,
        views: int = 0,
        fresh: bool = False,
        data_cache: str = "",
        source_root: str = "",
    ):
        self.store = TokenStore.open(location)
        if source_root:  # the same source files, somewhere else than where they were tokenized
            self.store.use_source_root(source_root)
        copy = self.store.node_copy(data_cache)  # mapped, once per node: random zarr reads are slow
        self.tokens = copy.tokens  # [N, V, gh, gw]
        self.grid = self.store.grid
        # views > 0: only the first `views` of each image's V (the V ablation on one store; the
        # views are drawn per (seed, image, view), so they are the views a V=`views` store holds)
        if views > self.store.views_per_image:
            raise StoreError(
                f"views = {views} is more than the {self.store.views_per_image} views per image {location} "
                "holds: lower it, or tokenize with more --views."
            )
        self.params = copy.views
        done = np.flatnonzero(copy.status == DONE)
        views = views or self.store.views_per_image
        self.plan = SamplePlan(done, views, self.grid, sampling)
        self.steps_per_epoch = self.plan.steps_per_epoch
        if self.steps_per_epoch == 0:
            raise StoreError(
                f"{location} has {len(done)} tokenized images, fewer than one global batch "
                f"({sampling.batch_size} x {sampling.world} ranks): lower --batch-size."
            )
        self.image_size = self.store.image_size
        self.tokenizer_size = self.store.tokenizer_size
        self.store.check_sources(done[:16])
        self.fresh = fresh
        if fresh:  # a new view every epoch, drawn as stage 1 draws them: needs each image's size
            self.view_seed = self.store.view_seed
            self.view_cfg = self.store.view_config
            self.sizes = copy.sizes if copy.sizes is not None else self._sizes(done, threads)
        self.pin = device_id is not None
        twin_render = (self.tokenizer_size, "tokenizer") if twin else None
        self.renders = ImageBatches(
            render_builder(1, self.image_size, "patches", threads, twin=twin_render),
            sampling.batch_size,
            device_id,
            sampling.seed,
        )

    # ---------------------------------------------------------------- batches

    def _sizes(self, done: np.ndarray, threads: int) -> np.ndarray:
        """(height, width) of the done images, read from their headers (a store made before
        stage 1 recorded them)."""
        sizes = np.zeros((len(self.store), 2), dtype=np.int64)
        shapes = ImageBatches(shape_builder(threads), 256, None, 0)
        for b0 in range(0, len(done), 256):
            chunk = done[b0 : b0 + 256]
            peeked, kept = shapes.run(self.store.items(chunk))
            sizes[chunk[kept]] = peeked[0]
        return sizes

    def batch(self, step: int) -> Batch:
        images, views, mask = self.plan.at(step)
        items = self.store.items(images)
        if self.fresh:  # view `epoch` of each image: the first V are the cached ones, then new ones
            epoch = self.plan.position(step)[0]
            params = draw_views(self.view_seed, images, self.sizes[images], 1, self.view_cfg, first=epoch)[:, 0]
            tokens = np.full((len(images), self.grid[0] * self.grid[1]), -1)  # no cached tokens for them
        else:
            params = self.params[images, views]
            tokens = self.tokens[images, views].reshape(len(images), -1)
        feeds = {"view0": list(params)}
        outputs, kept = self.renders.run(items, feeds)
        refuse_unreadable(self.store, items, images, kept)
        positions, valid = masked_positions(mask, self.plan.mask_count)
        pin = self.pin  # a GPU trainer copies these without blocking only from page-locked memory
        return Batch(
            pixels=as_tensor(outputs[0], pin),
            tokens=as_tensor(tokens.astype(np.int64), pin),
            mask=as_tensor(mask, pin),
            positions=as_tensor(positions, pin),
            valid=as_tensor(valid, pin),
            images=images,
            twin=as_tensor(outputs[1], pin) if len(outputs) > 1 else None,
        )

    def restart_at(self, origin: tuple[int, int]) -> None:
        """Micro-batch 0 starts at `origin` = (epoch, position) from now on (`SamplePlan`)."""
        plan = self.plan
        self.plan = plan.resharded(plan.batch_size, plan.rank, plan.world, origin)

    def stream(self, start_step: int, depth: int = 2):
        """Batches from global step `start_step` on, prepared `depth` ahead in a thread."""
        return prefetch(self.batch, start_step, depth)
