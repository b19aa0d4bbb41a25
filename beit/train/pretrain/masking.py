"""Which patches a pre-training sample hides.

`block_mask` is BEiT's blockwise masking (paper Algorithm 1, as released in unilm's
`masking_generator.py`): blocks are added until `count` patches are masked. Each block draws
an area uniformly in [min_block, remaining] and a log-uniform aspect ratio r in
[min_aspect, 1/min_aspect], takes h = round(sqrt(area * r)), w = round(sqrt(area / r)), is
accepted only if h < grid height, w < grid width and it adds between 1 and `remaining` new
patches, and gets 10 attempts; masking stops when `count` patches are masked or a block fails
10 times. So a mask never has more than `count` patches and on a 14x14 grid with 75 averages
about 74.5. Rounding h and w can make a block's area a little smaller than the area drawn
(area 16 at r = 1.5 gives 5 x 3 = 15), as in the released code.

`random_mask` hides exactly `count` patches chosen uniformly (the paper's ablation).

`block_masks` and `random_masks` make a whole batch at once with numpy, for the data thread:
the same algorithms, each mask drawn from its own counter key (`beit.shared.counter`; every
attempt of a round drawn at once, the first that fits is the block), so the same distribution
at a fraction of the time, and an image's mask does not depend on the batch it is in.

`block_mask` and `random_mask` take a `numpy.random.Generator`: callers decide the seeding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from beit.shared.counter import counter_key, counter_uniforms


@dataclass(frozen=True)
class Block:
    """One accepted block: its place, its size and the area and aspect it was drawn with."""

    top: int
    left: int
    height: int
    width: int
    area: float
    aspect: float
    added: int


def block_mask(
    rng: np.random.Generator,
    grid: tuple[int, int] = (14, 14),
    count: int = 75,
    min_block: int = 16,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    blocks: list[Block] | None = None,
) -> np.ndarray:
    """A blockwise mask: bool [gh, gw], True = masked. Accepted blocks are appended to
    `blocks` when a list is given (for tests and pictures)."""
    gh, gw = grid
    if not 0 < count <= gh * gw:
        raise ValueError(f"mask count {count} must be between 1 and the {gh * gw} patches of a {gh}x{gw} grid.")
    max_block = count if max_block is None else max_block
    min_block = min(min_block, count)  # a block may not need to exceed the whole mask
    log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)
    mask = np.zeros((gh, gw), dtype=bool)
    masked = 0
    while masked < count:
        limit = min(count - masked, max_block)
        added = 0
        for _ in range(10):
            # written out rather than rng.uniform(min_block, limit): limit < min_block is
            # legal here (the last block of a mask), as with Python's random.uniform
            area = min_block + (limit - min_block) * rng.random()
            aspect = math.exp(log_lo + (log_hi - log_lo) * rng.random())
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < gw and h < gh:
                top = int(rng.integers(0, gh - h + 1))
                left = int(rng.integers(0, gw - w + 1))
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= limit:
                    window[...] = True
                    added = new
                    if blocks is not None:
                        blocks.append(Block(top, left, h, w, area, aspect, new))
                    break
        if added == 0:
            break
        masked += added
    return mask


def random_mask(rng: np.random.Generator, grid: tuple[int, int] = (14, 14), count: int = 75) -> np.ndarray:
    """Exactly `count` patches chosen uniformly: bool [gh, gw], True = masked."""
    gh, gw = grid
    if not 0 < count <= gh * gw:
        raise ValueError(f"mask count {count} must be between 1 and the {gh * gw} patches of a {gh}x{gw} grid.")
    mask = np.zeros(gh * gw, dtype=bool)
    mask[rng.choice(gh * gw, size=count, replace=False)] = True
    return mask.reshape(gh, gw)


def block_masks(
    keys: np.ndarray,
    grid: tuple[int, int] = (14, 14),
    count: int = 75,
    min_block: int = 16,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    blocks: list[list[Block]] | None = None,
) -> np.ndarray:
    """One blockwise mask per uint64 key (`counter_key`), all at once: bool [len(keys), gh, gw].
    Each round gives every unfinished mask its next block: its 10 attempts are drawn together
    from (key, round), the first that fits and adds 1..remaining new patches wins (counted with
    2-D prefix sums); a mask whose 10 attempts all fail is done. A mask depends on its key only.
    When a list is given as `blocks`, one list per key is appended to it, holding that mask's
    accepted blocks in order (for tests and pictures); the masks are the same either way."""
    gh, gw = grid
    if not 0 < count <= gh * gw:
        raise ValueError(f"mask count {count} must be between 1 and the {gh * gw} patches of a {gh}x{gw} grid.")
    keys = np.asarray(keys, dtype=np.uint64)
    max_block = count if max_block is None else max_block
    min_block = min(min_block, count)
    log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)
    masks = np.zeros((len(keys), gh, gw), dtype=bool)
    masked = np.zeros(len(keys), dtype=np.int64)
    active = np.arange(len(keys))
    rows, cols = np.arange(gh)[None, :, None], np.arange(gw)[None, None, :]
    per_mask: list[list[Block]] = [[] for _ in range(len(keys) if blocks is not None else 0)]
    if blocks is not None:
        blocks.extend(per_mask)
    round_ = 0
    while len(active):
        u = counter_uniforms(counter_key(keys[active], round_), 40).reshape(len(active), 4, 10)
        round_ += 1
        limit = np.minimum(count - masked[active], max_block)[:, None]
        area = min_block + (limit - min_block) * u[:, 0]
        aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, 1])
        h = np.rint(np.sqrt(area * aspect)).astype(np.int64)  # rint rounds half to even, as round() does
        w = np.rint(np.sqrt(area / aspect)).astype(np.int64)
        fits = (h < gh) & (w < gw)
        h, w = np.where(fits, h, 0), np.where(fits, w, 0)
        top = (u[:, 2] * (gh - h + 1)).astype(np.int64)
        left = (u[:, 3] * (gw - w + 1)).astype(np.int64)
        sums = np.zeros((len(active), gh + 1, gw + 1), dtype=np.int64)
        sums[:, 1:, 1:] = masks[active].cumsum(1).cumsum(2)
        i = np.arange(len(active))[:, None]
        covered = sums[i, top + h, left + w] - sums[i, top, left + w] - sums[i, top + h, left] + sums[i, top, left]
        new = h * w - covered
        valid = fits & (new > 0) & (new <= limit)
        found = valid.any(1)
        pick = valid.argmax(1)[found]
        chosen = np.flatnonzero(found)
        t, l_, hh, ww = (a[chosen, pick][:, None, None] for a in (top, left, h, w))
        into = active[chosen]
        masks[into] |= (rows >= t) & (rows < t + hh) & (cols >= l_) & (cols < l_ + ww)
        masked[into] += new[chosen, pick]
        if blocks is not None:
            fields = (a[chosen, pick].tolist() for a in (top, left, h, w, area, aspect, new))
            for index, *block in zip(into.tolist(), *fields, strict=True):
                per_mask[index].append(Block(*block))
        active = into[masked[into] < count]
    return masks


def random_masks(keys: np.ndarray, grid: tuple[int, int] = (14, 14), count: int = 75) -> np.ndarray:
    """One mask of exactly `count` uniformly chosen patches per uint64 key: bool [len(keys), gh, gw]."""
    gh, gw = grid
    if not 0 < count <= gh * gw:
        raise ValueError(f"mask count {count} must be between 1 and the {gh * gw} patches of a {gh}x{gw} grid.")
    order = counter_uniforms(np.asarray(keys, dtype=np.uint64), gh * gw).argsort(1)
    masks = np.zeros((len(order), gh * gw), dtype=bool)
    np.put_along_axis(masks, order[:, :count], True, axis=1)
    return masks.reshape(len(order), gh, gw)


def masked_positions(masks: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Each mask's masked patches as a fixed number of positions, for a model step with static
    shapes (one compiled graph, whatever a batch's masks hold): masks bool [B, N] (or [B, gh, gw])
    -> (positions int64 [B, count], each row's masked patch indices ascending, padded with 0;
    valid bool [B, count], False on the padding). A mask of more than `count` patches is an error."""
    masks = np.asarray(masks, dtype=bool).reshape(len(masks), -1)
    most = int(masks.sum(1).max(initial=0))
    if most > count:
        raise ValueError(f"a mask holds {most} patches, more than the {count} positions it is given.")
    order = np.argsort(~masks, axis=1, kind="stable")[:, :count]  # masked patches first, in order
    valid = np.take_along_axis(masks, order, axis=1)
    return np.where(valid, order, 0).astype(np.int64), valid
