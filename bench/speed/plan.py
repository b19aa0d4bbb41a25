"""Time stage 2's per-batch plan (which images, views and masks a step gets) at ImageNet scale.

    python bench/speed/plan.py [--images 1281167] [--batch 256] [--steps 40]

The plan runs in the data thread beside the trainer, once per batch per rank, holding the GIL
for most of it. Counted first: per batch, one slice of the epoch's image order (a permutation
of all images, drawn once per epoch), B view choices and B masks. Printed: the median time per
batch of the plan as it is (views by one hash, masks a batch at once: `block_masks`), and of
the per-image way it replaced (a generator per image for its view, `block_mask` per image, and
the epoch's permutation drawn again for every batch).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np

from beit.train.pretrain.data import SamplePlan, Sampling
from beit.train.pretrain.masking import block_mask, random_mask


def median_ms(run, steps: int) -> float:
    times = []
    for step in range(steps):
        start = time.perf_counter()
        run(step)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1_281_167)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    done = np.arange(args.images)
    for kind in ("block", "random"):
        plan = SamplePlan(done, 10, (14, 14), Sampling(args.batch, seed=0, mask=kind))
        plan.at(0)  # draws the first epoch's order
        now = median_ms(plan.at, args.steps)
        if kind == "block":
            one_mask = functools.partial(block_mask, grid=plan.grid, count=plan.mask_count, min_block=plan.min_block)
        else:
            one_mask = functools.partial(random_mask, grid=plan.grid, count=plan.mask_count)

        def per_image(step: int, one_mask=one_mask) -> None:
            images = done[np.random.default_rng([0, 0]).permutation(args.images)][: args.batch]
            for i in images:
                np.random.default_rng([0, int(i), 0, 1]).permutation(10)
                one_mask(np.random.default_rng([0, 0, int(i), 2]))

        before = median_ms(per_image, max(3, args.steps // 8))
        ratio = before / now
        print(f"{kind} masks: plan {now:.1f} ms per batch of {args.batch}; per image: {before:.1f} ms ({ratio:.0f}x)")


if __name__ == "__main__":
    main()
