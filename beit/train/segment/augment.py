"""The augmentation released with BEiT for segmentation (mmseg's ADE20K pipeline), in torch on
the decoded image wherever it is (CPU or GPU), with OpenCV's sampling rules.

Training views, as mmseg: resize keeping the aspect ratio, the long side at most scale[0] * r and
the short side at most scale[1] * r, r uniform in ratio_range (mmcv's rescale rule); a crop x crop
window, redrawn up to 10 times while one class covers `cat_max_ratio` or more of its labelled
pixels (or it holds one class); horizontal flip (p 0.5); photometric distortion (brightness +-32,
contrast 0.5-1.5 before or after saturation 0.5-1.5 and hue +-18 OpenCV units, each p 0.5);
ImageNet normalisation; padding to crop with 0 (pixels) and the ignore index (labels).
Evaluation views: resized to the base scale, normalised; labels kept at the original size.

Masks are resized with nearest neighbour only, OpenCV's rule (source index floor(i * in / out)),
so labels match mmseg's. Images are resized bilinearly (align_corners=False, no antialiasing:
cv2.INTER_LINEAR's sampling) and kept in float, where mmseg rounds to uint8 after each step and
shifts hue and saturation in OpenCV's 8-bit HSV.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from beit.shared.views import imagenet_stats


def rescaled_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with the long side <= max(scale) and the short
    side <= min(scale), rounded half up. Returns (height, width)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output pixel under OpenCV's INTER_NEAREST: floor(i * in / out)."""
    return np.minimum((np.arange(size_out) * (size_in / size_out)).astype(np.int64), size_in - 1)


def choose_crop(mask: np.ndarray, crop: int, cat_max_ratio: float, ignore: int, rng) -> tuple[int, int]:
    """Top-left (y, x) of a crop x crop window of `mask` [H, W] as mmseg's RandomCrop: redrawn up
    to 10 times until it holds two classes or more and none has `cat_max_ratio` of its labelled pixels."""

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(mask.shape[0] - crop, 0) + 1)), int(
            rng.integers(0, max(mask.shape[1] - crop, 0) + 1)
        )

    y, x = draw()
    if cat_max_ratio < 1:
        for _ in range(10):
            counts = np.bincount(mask[y : y + crop, x : x + crop].ravel(), minlength=256)
            counts[ignore] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    return y, x


def adjust_hsv(image: torch.Tensor, saturation: float = 1.0, hue: int = 0) -> torch.Tensor:
    """[3, H, W] RGB in 0-255 with its HSV saturation times `saturation` (clipped) and its hue
    turned by `hue` OpenCV units (2 degrees each), in float."""
    value, low = image.amax(0), image.amin(0)
    delta = value - low
    safe = delta.clamp(min=1e-6)
    red, green, blue = image
    sextant = torch.where(
        value == red,
        ((green - blue) / safe) % 6,
        torch.where(value == green, (blue - red) / safe + 2, (red - green) / safe + 4),
    )
    sextant = (torch.where(delta > 0, sextant, 0) + hue / 30) % 6
    sat = (torch.where(value > 0, delta / value.clamp(min=1e-6), 0) * saturation).clamp(max=1)
    k = (torch.tensor([5.0, 3.0, 1.0], device=image.device).view(3, 1, 1) + sextant) % 6
    return value - value * sat * torch.minimum(k, 4 - k).clamp(0, 1)


def photometric_distortion(image: torch.Tensor, rng) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on [3, H, W] RGB in 0-255: brightness, then contrast before
    or after saturation and hue (a coin picks), each step with probability 0.5."""
    if rng.integers(2):
        image = (image + rng.uniform(-32, 32)).clamp(0, 255)
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        image = (image * rng.uniform(0.5, 1.5)).clamp(0, 255)
    saturation = rng.uniform(0.5, 1.5) if rng.integers(2) else 1.0
    hue = int(rng.integers(-18, 18)) if rng.integers(2) else 0  # numpy's randint(-18, 18), as mmseg
    if saturation != 1.0 or hue:
        image = adjust_hsv(image, saturation, hue)
    if not contrast_first and rng.integers(2):
        image = (image * rng.uniform(0.5, 1.5)).clamp(0, 255)
    return image


def _resized(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, h, w] float 0-255, bilinear like cv2.INTER_LINEAR."""
    chw = image.permute(2, 0, 1).float()
    if tuple(chw.shape[1:]) == size:
        return chw
    return F.interpolate(chw[None], size=size, mode="bilinear", align_corners=False)[0]


def train_view(
    image: torch.Tensor,
    mask: np.ndarray,
    rng,
    crop: int,
    scale: tuple[int, int] = (2048, 512),
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    ignore_index: int = 255,
    photometric: bool = True,
) -> tuple[torch.Tensor, np.ndarray]:
    """One training sample: `image` [H, W, 3] uint8 (on any device) and `mask` [H, W] uint8 ->
    (pixels [3, crop, crop] float32 normalised, on the image's device; labels [crop, crop] uint8)."""
    ratio = rng.uniform(*ratio_range)
    height, width = rescaled_size(*mask.shape, (int(scale[0] * ratio), int(scale[1] * ratio)))
    labels = mask[np.ix_(nearest_indices(mask.shape[0], height), nearest_indices(mask.shape[1], width))]
    y, x = choose_crop(labels, crop, cat_max_ratio, ignore_index, rng)
    labels = labels[y : y + crop, x : x + crop]
    pixels = _resized(image, (height, width))[:, y : y + crop, x : x + crop]
    if rng.random() < 0.5:
        pixels, labels = pixels.flip(-1), labels[:, ::-1]
    if photometric:
        pixels = photometric_distortion(pixels, rng)
    mean, std = imagenet_stats(pixels.device, 255.0)
    out = torch.zeros(3, crop, crop, device=pixels.device)
    out[:, : labels.shape[0], : labels.shape[1]] = (pixels - mean) / std
    padded = np.full((crop, crop), ignore_index, dtype=np.uint8)
    padded[: labels.shape[0], : labels.shape[1]] = labels
    return out, padded


def eval_view(image: torch.Tensor, scale: tuple[int, int] = (2048, 512)) -> torch.Tensor:
    """`image` [H, W, 3] uint8 -> [1, 3, h, w] float32 normalised, resized to the base scale."""
    mean, std = imagenet_stats(image.device, 255.0)
    return ((_resized(image, rescaled_size(*image.shape[:2], scale)) - mean) / std)[None]
