"""Counter-based random numbers: pure functions of integer keys, vectorised with numpy.

A draw depends only on its key (seed, image, view, ...), never on what else was drawn before or
beside it, so a view's parameters, an image's view order and its mask are the same in any batch,
on any rank and after any restart. The mixer is splitmix64's finaliser.

    key = counter_key(seed, images, views)       # uint64, broadcast over the parts
    u = counter_uniforms(key, 4)                 # float64 [..., 4] in [0, 1)
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of uint64s."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _u64(value) -> np.ndarray:
    if isinstance(value, int):
        return np.uint64(value & 0xFFFFFFFFFFFFFFFF)
    return np.asarray(value).astype(np.uint64)


def counter_key(seed, *parts) -> np.ndarray:
    """A uint64 key for (seed, *parts); ints or integer arrays, broadcast together. A key may
    itself be the seed of a further key."""
    with np.errstate(over="ignore"):
        key = splitmix(_u64(seed) + _GOLDEN)
        for part in parts:
            key = splitmix(key + _u64(part) * _GOLDEN)
    return key


def counter_uniforms(key: np.ndarray, count: int) -> np.ndarray:
    """float64 [*key.shape, count] in [0, 1): the first `count` draws of each key."""
    with np.errstate(over="ignore"):
        j = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
        bits = splitmix(np.asarray(key, dtype=np.uint64)[..., None] + j)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
