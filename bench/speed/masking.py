"""Time mask generation on one core: blockwise (BEiT) and random, 14x14 grid, 75 patches.

python bench/speed/masking.py [--masks 20000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from beit.train.pretrain.masking import block_mask, random_mask


def per_mask_us(make, masks: int, rounds: int = 5) -> float:
    rng = np.random.default_rng(0)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(masks // rounds):
            make(rng)
        times.append((time.perf_counter() - start) / (masks // rounds) * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--masks", type=int, default=20000)
    args = parser.parse_args()
    block = per_mask_us(lambda rng: block_mask(rng, (14, 14), 75), args.masks)
    rand = per_mask_us(lambda rng: random_mask(rng, (14, 14), 75), args.masks)
    print(f"blockwise mask: {block:.1f} us/mask (median of 5 rounds, {args.masks} masks)")
    print(f"random mask:    {rand:.1f} us/mask")


if __name__ == "__main__":
    main()
