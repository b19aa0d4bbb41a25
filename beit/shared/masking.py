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

Both take a `numpy.random.Generator`, so callers decide how masks are seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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
