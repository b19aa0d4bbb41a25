"""Semantic segmentation evaluation as mmsegmentation computes it: the confusion matrix, mIoU,
mAcc and aAcc, and whole-image, sliding-window, multi-scale and flip inference. Pure torch.

Metrics (mmseg `total_area_to_metrics`): over all labelled pixels of a data set, IoU_c =
TP / (TP + FP + FN), Acc_c = TP / (TP + FN), aAcc = sum TP / labelled pixels. A 0 / 0 is NaN
and means skip NaN: a class absent from both prediction and ground truth counts in neither
mean; a class predicted but absent from the ground truth has IoU 0 (it lowers mIoU) and
Acc NaN (left out of mAcc).

Inference (mmseg 0.x `EncoderDecoder`, which the released BEiT code runs): each augmentation's
logits are resized to the input size (bilinear, align_corners=False), turned into softmax
probabilities and flipped back; the probabilities are averaged. Scales are relative to the
input image, or to `base_size` for its short side. A sliding window is clamped to the image;
where the image is smaller than the window, mmseg runs the smaller window as it is (and the
released test pipeline enlarges the short side to at least the crop first), but this project's
model has its relative position tables fixed to the crop's grid, so the window is padded at
the bottom and right with zeros (after normalisation: the mean colour, as the training
pipeline pads its crops) and the padded logits are dropped.

Shapes: image [B, 3, H, W], normalised; model(x [B, 3, h, w]) -> logits [B, C, h', w'];
labels [B, H, W] int with `ignore_index` for unlabelled pixels; confusion [C, C] int64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from beit.shared.preempt import stop_point

if TYPE_CHECKING:
    from beit.train.segment.data import SegmentationData

Model = Callable[[torch.Tensor], torch.Tensor]


def confusion(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """The [C, C] int64 confusion matrix (rows ground truth, columns prediction) of one or
    many images (pred and label of one shape, e.g. [B, H, W]), on their device. Pixels labelled
    `ignore_index` are left out; sum the matrices of a data set's batches with `+=`."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape.")
    keep = label != ignore_index
    label, pred = label[keep].long(), pred[keep].long()
    for what, values in (("label", label), ("predicted", pred)):
        bad = (values < 0) | (values >= num_classes)
        if bool(bad.any()):  # one host sync per call; a wrong value would land in another class's bin
            found = values[bad].unique().tolist()[:5]
            raise ValueError(f"{what} values {found} are outside 0..{num_classes - 1} and not the ignore index.")
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def _nan_mean(values: np.ndarray) -> float:
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


def segmentation_metrics(confusion: torch.Tensor, class_names: Sequence[str] | None = None) -> dict:
    """{"mIoU", "mAcc", "aAcc", "per_class": [{"name", "iou", "acc"}]} of a confusion matrix,
    as fractions (not percentages); NaN where a ratio is 0 / 0, left out of the means."""
    counts = confusion.detach().cpu().double().numpy()
    true_positive = np.diag(counts)
    labelled = counts.sum(1)  # TP + FN
    predicted = counts.sum(0)  # TP + FP
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = true_positive / (labelled + predicted - true_positive)
        acc = true_positive / labelled
    total = labelled.sum()
    names = list(class_names) if class_names is not None else [str(c) for c in range(len(counts))]
    if len(names) != len(counts):
        raise ValueError(f"{len(names)} class names for a {len(counts)}-class confusion matrix.")
    return {
        "mIoU": _nan_mean(iou),
        "mAcc": _nan_mean(acc),
        "aAcc": float(true_positive.sum() / total) if total else math.nan,
        "per_class": [{"name": n, "iou": float(i), "acc": float(a)} for n, i, a in zip(names, iou, acc, strict=True)],
    }


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _run(model: Model, image: torch.Tensor, num_classes: int) -> torch.Tensor:
    """model(image) as float32 logits [B, C, H, W] at the image's size (mmseg's
    `encode_decode` resizes a head's smaller map the same way)."""
    logits = model(image)
    if logits.dim() != 4 or logits.shape[:2] != (image.shape[0], num_classes):
        raise ValueError(f"the model returned {tuple(logits.shape)}; expected [{image.shape[0]}, {num_classes}, h, w].")
    logits = logits.float()
    if logits.shape[2:] != image.shape[2:]:
        logits = F.interpolate(logits, size=image.shape[2:], mode="bilinear", align_corners=False)
    return logits


@torch.no_grad()
def whole_logits(model: Model, image: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits [B, C, H, W] of the whole image [B, 3, H, W] in one forward pass."""
    return _run(model, image, num_classes)


@torch.no_grad()
def slide_logits(
    model: Model, image: torch.Tensor, num_classes: int, crop: int | Sequence[int], stride: int | Sequence[int]
) -> torch.Tensor:
    """Logits [B, C, H, W] from overlapping crop windows [B, 3, crop_h, crop_w] on a grid of
    ceil((H - crop_h) / stride_h) + 1 rows (likewise columns), each window clamped to the image,
    averaged over the windows that cover each pixel (mmseg's `slide_inference`)."""
    (crop_h, crop_w), (stride_h, stride_w) = _pair(crop), _pair(stride)
    batch, _, height, width = image.shape
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    total = image.new_zeros((batch, num_classes, height, width), dtype=torch.float32)
    count = image.new_zeros((1, 1, height, width), dtype=torch.float32)
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            window = image[:, :, y1:y2, x1:x2]
            h, w = y2 - y1, x2 - x1
            if (h, w) != (crop_h, crop_w):  # only when the image is smaller than the crop
                window = F.pad(window, (0, crop_w - w, 0, crop_h - h))
            total[:, :, y1:y2, x1:x2] += _run(model, window, num_classes)[:, :, :h, :w]
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


def _scaled_size(height: int, width: int, scale: float, base_size: int | None) -> tuple[int, int]:
    factor = scale * (base_size / min(height, width) if base_size else 1.0)
    return int(height * factor + 0.5), int(width * factor + 0.5)  # mmcv's rounding


@torch.no_grad()
def predict_logits(
    model: Model,
    image: torch.Tensor,
    num_classes: int,
    mode: str = "whole",
    crop: int | Sequence[int] = 512,
    stride: int | Sequence[int] = 341,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    base_size: int | None = None,
) -> torch.Tensor:
    """Class probabilities [B, C, H, W] of an image batch [B, 3, H, W], averaged over the
    augmentations: each scale (the image resized bilinearly to scale x its size, or, with
    `base_size`, to a short side of scale x base_size), and each also mirrored when `flip`.
    Each augmentation runs `mode` ("whole" or "slide" with crop and stride); its logits are
    resized back to H x W, softmaxed and un-mirrored before the average, as mmseg's
    `aug_test`. The model should be in eval mode."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode is {mode!r}; use 'whole' or 'slide'.")
    if not scales:
        raise ValueError("scales is empty; give at least one (1.0 is the image's own size).")
    height, width = image.shape[2:]
    probabilities = image.new_zeros((image.shape[0], num_classes, height, width), dtype=torch.float32)
    runs = 0
    for scale in scales:
        size = _scaled_size(height, width, scale, base_size)
        scaled = image if size == (height, width) else F.interpolate(image, size, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            view = scaled.flip(3) if mirrored else scaled
            if mode == "slide":
                logits = slide_logits(model, view, num_classes, crop, stride)
            else:
                logits = whole_logits(model, view, num_classes)
            if logits.shape[2:] != (height, width):
                logits = F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)
            scores = logits.softmax(1)
            probabilities += scores.flip(3) if mirrored else scores
            runs += 1
    return probabilities / runs


def predict(model: Model, image: torch.Tensor, num_classes: int, **options: Any) -> torch.Tensor:
    """Labels [B, H, W] (int64): the argmax of `predict_logits` with the same arguments."""
    return predict_logits(model, image, num_classes, **options).argmax(1)


@torch.no_grad()
def evaluate_segmenter(
    model, data: SegmentationData, mode: str, stride: int, scales=(1.0,), flip=False, keep: int = 0
) -> dict:
    """mIoU, mAcc, aAcc and per-class IoU over `data`'s images at their original size ("images"
    read, "skipped" of those listed could not be); with
    `keep`, also "examples": the first `keep` (key, pixels [3, h, w] as fed, labels, prediction)."""
    model.eval()
    classes, crop = model.cfg.num_classes, model.cfg.image_size
    total, examples, images = None, [], 0
    for key, pixels, labels in data.images():
        stop_point(f"after {images} of the {data.inputs.listed} images")  # `beit segment evaluate` alone
        images += 1
        scores = predict_logits(model, pixels, classes, mode=mode, crop=crop, stride=stride, scales=scales, flip=flip)
        scores = torch.nn.functional.interpolate(scores, size=labels.shape, mode="bilinear", align_corners=False)
        prediction = scores.argmax(1)[0]
        matrix = confusion(prediction, labels.to(scores.device), classes, data.source.ignore_index)
        total = matrix if total is None else total + matrix
        if len(examples) < keep:
            examples.append((key, pixels[0].cpu(), labels.cpu(), prediction.cpu()))
    model.train()
    if total is None:
        raise ValueError(
            f"none of the {data.inputs.listed} images of {data.source.root} could be read: check the files."
        )
    figures = segmentation_metrics(total, data.source.class_names)
    return {
        **figures,
        "images": images,
        "skipped": len(data.inputs.skipped),
        **({"examples": examples} if keep else {}),
    }
