import math

import numpy as np
import pytest

from beit.shared.masking import Block, block_mask, random_mask


def test_blockwise_masking_statistics_over_20000_masks():
    rng = np.random.default_rng(0)
    counts = []
    low, high = math.log(0.3), math.log(1 / 0.3)
    small_blocks = 0
    for _ in range(20_000):
        blocks: list[Block] = []
        mask = block_mask(rng, (14, 14), 75, blocks=blocks)
        counts.append(int(mask.sum()))
        assert sum(b.added for b in blocks) == mask.sum()
        masked = 0
        for b in blocks:
            remaining = 75 - masked
            # the drawn area lies in [16, remaining] (in [remaining, 16] for a last block below 16)
            assert min(16, remaining) <= b.area <= max(16, remaining)
            assert low <= math.log(b.aspect) <= high
            assert (b.height, b.width) == (round(math.sqrt(b.area * b.aspect)), round(math.sqrt(b.area / b.aspect)))
            assert b.height < 14 and b.width < 14
            assert 1 <= b.added <= remaining
            assert mask[b.top : b.top + b.height, b.left : b.left + b.width].all()
            small_blocks += remaining >= 16 and b.height * b.width < 16
            masked += b.added
    counts = np.array(counts)
    assert counts.max() <= 75
    assert 74.0 <= counts.mean() <= 75.0
    # rounding h and w makes some blocks a little smaller than their drawn area, as released
    assert small_blocks > 0


def test_masks_are_reproducible_from_the_generator():
    a = block_mask(np.random.default_rng(7))
    b = block_mask(np.random.default_rng(7))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, block_mask(np.random.default_rng(8)))


@pytest.mark.parametrize("grid,count", [((7, 10), 30), ((24, 24), 230), ((4, 4), 6), ((14, 14), 1)])
def test_any_grid_and_count(grid, count):
    rng = np.random.default_rng(1)
    sums = [block_mask(rng, grid, count).sum() for _ in range(300)]
    assert max(sums) <= count and np.mean(sums) >= 0.9 * count


def test_random_mask_hides_exactly_count_uniformly():
    rng = np.random.default_rng(0)
    masks = np.stack([random_mask(rng, (14, 14), 75) for _ in range(4000)])
    assert np.all(masks.sum(axis=(1, 2)) == 75)
    frequency = masks.mean(axis=0)
    assert np.allclose(frequency, 75 / 196, atol=0.04)


def test_bad_counts_are_clear_errors():
    with pytest.raises(ValueError, match="between 1 and the 196 patches"):
        block_mask(np.random.default_rng(0), (14, 14), 200)
    with pytest.raises(ValueError, match="between 1 and the 16 patches"):
        random_mask(np.random.default_rng(0), (4, 4), 0)
