import math

import numpy as np
import pytest

from beit.shared.counter import counter_key
from beit.train.pretrain.masking import Block, block_mask, block_masks, random_mask, random_masks


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


def test_batched_block_masks_match_the_released_algorithm_in_distribution():
    batched = block_masks(counter_key(0, np.arange(20_000)))
    rng = np.random.default_rng(0)
    single = np.stack([block_mask(rng) for _ in range(20_000)])
    for masks in (batched, single):
        assert masks.shape == (20_000, 14, 14) and masks.sum((1, 2)).max() <= 75
    counts, reference = batched.sum((1, 2)), single.sum((1, 2))
    # 20,000 masks each: the means differ by about 0.01 (standard error 0.01); the share of
    # masks with all 75 patches (0.66) by a standard error of 0.005; each patch's masking rate
    # (about 0.38) by 0.005, so 0.025 is five of them
    assert abs(counts.mean() - reference.mean()) < 0.05
    assert abs((counts == 75).mean() - (reference == 75).mean()) < 0.025
    assert np.abs(batched.mean(0) - single.mean(0)).max() < 0.025

    # blocks, not scattered patches: a masked patch mostly has masked neighbours, as released
    def neighbours(m):
        pairs = (m[:, 1:] & m[:, :-1]).sum() + (m[:, :, 1:] & m[:, :, :-1]).sum()
        return pairs / m.sum()

    assert abs(neighbours(batched) - neighbours(single)) < 0.02


def test_batched_masks_depend_on_their_own_key_only():
    keys = counter_key(3, np.arange(64))
    for make in (block_masks, random_masks):
        together = make(keys, (7, 7), 19)
        assert np.array_equal(together[::-1], make(keys[::-1], (7, 7), 19))
        assert np.array_equal(together[5:6], make(keys[5:6], (7, 7), 19))
    exact = random_masks(counter_key(0, np.arange(4000)), (14, 14), 75)
    assert np.all(exact.sum((1, 2)) == 75) and np.allclose(exact.mean(0), 75 / 196, atol=0.04)


def test_batched_block_masks_report_their_blocks_without_changing_the_masks():
    keys = counter_key(5, np.arange(500))
    blocks: list[list[Block]] = []
    masks = block_masks(keys, (14, 14), 75, blocks=blocks)
    assert np.array_equal(masks, block_masks(keys, (14, 14), 75))
    assert len(blocks) == 500
    low, high = math.log(0.3), math.log(1 / 0.3)
    for mask, drawn in zip(masks, blocks, strict=True):
        union = np.zeros((14, 14), dtype=bool)
        masked = 0
        for b in drawn:
            remaining = 75 - masked
            assert min(16, remaining) <= b.area <= max(16, remaining) and low <= math.log(b.aspect) <= high
            assert (b.height, b.width) == (round(math.sqrt(b.area * b.aspect)), round(math.sqrt(b.area / b.aspect)))
            window = union[b.top : b.top + b.height, b.left : b.left + b.width]
            assert b.added == b.height * b.width - window.sum() and 1 <= b.added <= remaining
            window[...] = True
            masked += b.added
        assert np.array_equal(union, mask) and masked == mask.sum()
