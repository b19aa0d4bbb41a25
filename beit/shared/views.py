"""A view: one augmentation of one source image, fully described by recorded parameters, and
the one place that renders a view from them (stage 1 at the tokenizer's size, stage 2 at the
patch size, `beit store verify` again at either).

Parameters, per view, float32 [8] (`PARAMS`):

    x, y, w, h      crop box in source pixels (after EXIF orientation), integers
    flip            1 = mirror horizontally, 0 = not
    brightness, contrast, saturation    colour jitter factors in [1 - jitter, 1 + jitter]

drawn by `draw_views` from a counter-based generator keyed by (seed, image index, view index)
alone: never by batch position, rank or resume point, so any shard or restart draws the same
views. The box follows RandomResizedCrop (scale (0.08, 1), aspect (3/4, 4/3) log-uniform,
10 attempts, then the centre-crop fallback); flip has p = 0.5.

Rendering (`render`, DALI): slice the decoded image by the integer box, resize to the output
size (Lanczos for the tokenizer's 112 px, bicubic for the 224 px patches, antialiased),
colour jitter (DALI color_twist: brightness and contrast scale about mid-grey, saturation in
HSV; applied after crop and resize, to each rendering: the operations are pointwise, so they
commute with crop and resize up to rounding), then flip and conversion to float CHW.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from beit.shared.counter import counter_key, counter_uniforms
from beit.shared.decode import pipeline_builder, require_dali

PARAMS = ("x", "y", "w", "h", "flip", "brightness", "contrast", "saturation")
JITTER_PLACEMENT = "after crop and resize, before flip; DALI color_twist (brightness, contrast about 128, saturation)"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.cache
def imagenet_stats(device="cpu", scale: float = 1.0):
    """ImageNet mean and std times `scale` (255 for pixels in 0..255) as [3, 1, 1] torch tensors on
    `device`, made once per device and scale (a copy to the GPU in every step would wait for it).
    Shared: never change them in place."""
    import torch

    mean = torch.tensor([scale * m for m in IMAGENET_MEAN], device=device).view(3, 1, 1)
    return mean, torch.tensor([scale * s for s in IMAGENET_STD], device=device).view(3, 1, 1)


@dataclass
class ViewConfig:
    """How views are drawn and rendered (DESIGN.md section 3)."""

    image_size: int = 224
    tokenizer_size: int = 0  # 0: the tokenizer's own input size (112 for the DALL-E dVAE)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    attempts: int = 10
    flip_p: float = 0.5
    jitter: float = 0.4


# ---------------------------------------------------------------- drawing parameters


def uniforms(seed: int, images: np.ndarray, views: np.ndarray, count: int) -> np.ndarray:
    """[n, count] float64 in [0, 1): a pure function of (seed, image, view, j)."""
    return counter_uniforms(counter_key(seed, np.asarray(images), np.asarray(views)), count)


def draw_views(
    seed: int, image_indices: np.ndarray, sizes: np.ndarray, views: int, cfg: ViewConfig, first: int = 0
) -> np.ndarray:
    """float32 [n, views, 8] parameters of views first .. first + views - 1 of images
    `image_indices` of (height, width) `sizes`."""
    image_indices = np.asarray(image_indices)
    n = len(image_indices)
    img = np.repeat(image_indices, views)
    view = np.tile(np.arange(first, first + views), n)
    height = np.repeat(np.asarray(sizes)[:, 0], views).astype(np.float64)
    width = np.repeat(np.asarray(sizes)[:, 1], views).astype(np.float64)
    u = uniforms(seed, img, view, 4 * cfg.attempts + 4)

    area = height * width
    log_lo, log_hi = np.log(cfg.ratio[0]), np.log(cfg.ratio[1])
    box = np.zeros((n * views, 4))
    done = np.zeros(n * views, dtype=bool)
    for a in range(cfg.attempts):
        target = area * (cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * u[:, 4 * a])
        aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, 4 * a + 1])
        w = np.round(np.sqrt(target * aspect))
        h = np.round(np.sqrt(target / aspect))
        ok = ~done & (w > 0) & (w <= width) & (h > 0) & (h <= height)
        y = np.floor(u[:, 4 * a + 2] * (height - h + 1))
        x = np.floor(u[:, 4 * a + 3] * (width - w + 1))
        box[ok] = np.stack([x, y, w, h], axis=1)[ok]
        done |= ok
    # the fallback: a centre crop at the nearest allowed aspect ratio
    rest = ~done
    in_ratio = width / height
    w = np.where(
        in_ratio < cfg.ratio[0], width, np.where(in_ratio > cfg.ratio[1], np.round(height * cfg.ratio[1]), width)
    )
    h = np.where(in_ratio < cfg.ratio[0], np.round(width / cfg.ratio[0]), height)
    box[rest] = np.stack([np.floor((width - w) / 2), np.floor((height - h) / 2), w, h], axis=1)[rest]

    base = 4 * cfg.attempts
    flip = (u[:, base] < cfg.flip_p).astype(np.float64)
    colour = 1.0 + cfg.jitter * (2.0 * u[:, base + 1 : base + 4] - 1.0)
    params = np.concatenate([box, flip[:, None], colour], axis=1).astype(np.float32)
    return params.reshape(n, views, len(PARAMS))


# ---------------------------------------------------------------- rendering (DALI)


def render(images, params, size: int, kind: str):
    """DALI graph fragment: decoded HWC uint8 `images` + a float32 [8] `params` node (CPU) ->
    float32 CHW [3, size, size]. kind 'tokenizer': Lanczos, values in [0, 1];
    kind 'patches': bicubic, normalised with the ImageNet mean and std."""
    require_dali()
    from nvidia.dali import fn, types

    anchor = fn.cast(params[0:2], dtype=types.INT32)
    shape = fn.cast(params[2:4], dtype=types.INT32)
    flip = fn.cast(params[4], dtype=types.INT32)
    crop = fn.slice(images, anchor, shape, axis_names="WH", normalized_anchor=False, normalized_shape=False)
    interp = types.INTERP_LANCZOS3 if kind == "tokenizer" else types.INTERP_CUBIC
    resized = fn.resize(crop, size=[size, size], interp_type=interp, antialias=True)
    coloured = fn.color_twist(resized, brightness=params[5], contrast=params[6], saturation=params[7])
    if kind == "tokenizer":
        mean, std = [0.0] * 3, [255.0] * 3
    else:
        mean, std = [255.0 * m for m in IMAGENET_MEAN], [255.0 * s for s in IMAGENET_STD]
    return fn.crop_mirror_normalize(coloured, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std, mirror=flip)


def shape_builder(threads: int = 0):
    """Pipeline factory for `ImageBatches`: encoded bytes -> (height, width) after EXIF orientation."""
    require_dali()
    from nvidia.dali import fn, types

    def graph(encoded, device_id):
        return fn.peek_image_shape(encoded, dtype=types.INT64)[0:2]

    return pipeline_builder(graph, threads, decoded=False, gpu=False)


def render_builder(views: int, size: int, kind: str, threads: int = 0, twin: tuple[int, str] | None = None):
    """Pipeline factory for `ImageBatches`: one decode of each image, then `views` renderings
    from the parameter inputs "view0" .. "view{views-1}" (float32 [8] each) -> `views` outputs
    [3, size, size] float32 per image; with `twin` = (size, kind), each view is rendered a
    second time at that size too (outputs view0, twin0, view1, twin1, ...)."""
    require_dali()
    from nvidia.dali import fn, types

    def graph(images, device_id):
        outputs = []
        for v in range(views):
            params = fn.external_source(name=f"view{v}", dtype=types.FLOAT, ndim=1)
            outputs.append(render(images, params, size, kind))
            if twin is not None:
                outputs.append(render(images, params, *twin))
        return tuple(outputs)

    return pipeline_builder(graph, threads)
