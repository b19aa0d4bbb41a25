"""`beit segment evaluate` and `beit segment predict`: a trained segmenter on labelled data
(mIoU, mAcc, aAcc, per-class IoU) and on any images (palette PNG masks, overlays to look at).

    beit segment evaluate runs/seg/best.pt DATA --mode slide --scales 0.5,0.75,1.0,1.25,1.5,1.75 --flip
    beit segment predict runs/seg/best.pt a.jpg b.jpg -o masks/ --overlay

An image that cannot be read is skipped and counted: evaluation's figures say what they are over
(the skipped files beside its --json file), prediction writes OUT/skipped.jsonl.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from beit.shared.checkpoint import CheckpointError, load_checkpoint, load_weights
from beit.shared.decode import precheck
from beit.shared.dist import choose_device, dali_device_id
from beit.shared.inputs import MAX_SKIPPED_FRACTION, Inputs, SkippedLog
from beit.shared.preempt import stop_point
from beit.shared.views import IMAGENET_MEAN, IMAGENET_STD
from beit.train.model import ModelConfig
from beit.train.segment.augment import eval_view
from beit.train.segment.data import SegmentationData, segmentation_inputs
from beit.train.segment.datasets import read_segmentation
from beit.train.segment.inference import evaluate_segmenter, predict_logits
from beit.train.segment.model import BeitSegmenter


def load_segmenter(path: Path) -> tuple[BeitSegmenter, dict]:
    """The segmenter of a `beit segment train` checkpoint, in eval mode, and its meta."""
    state, meta = load_checkpoint(path)
    return segmenter_from(state, meta, path), meta


def segmenter_from(state: dict, meta: dict, path: Path) -> BeitSegmenter:
    """The segmenter in the (state, meta) of the checkpoint at `path` (`load_checkpoint`), in eval mode."""
    if meta.get("kind") != "segment":
        raise CheckpointError(f"{path} is a {meta.get('kind')} checkpoint: pass one written by `beit segment train`.")
    model = BeitSegmenter(
        ModelConfig(**meta["model"]), meta["head"], meta["channels"], meta["aux_channels"], tuple(meta["out_indices"])
    )
    load_weights(model, state["model"], source=str(path))
    return model.eval()


def evaluate_segmenter_checkpoint(
    checkpoint: Path,
    data: Path,
    split: str = "val",
    mode: str = "slide",
    stride: int = 0,
    scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
    device: str = "auto",
    picture: Path | None = None,
    examples: int = 6,
    max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
    skipped_file: Path | None = None,
) -> dict:
    """The checkpoint's metrics on DATA's `split`, read as the training data was read, with
    "inputs" (listed, read, skipped; the skipped in `skipped_file` when given, else in the result)
    and "basis"; with `picture`, a PNG of the first `examples` images beside their ground truth and prediction."""
    model, meta = load_segmenter(checkpoint)
    reading = meta.get("data", {})
    source = read_segmentation(data, split, **reading)
    if source.class_names != meta["class_names"]:
        raise ValueError(f"{data} has other classes than {checkpoint} was trained on: evaluate on its data.")
    torch_device = choose_device(device)
    model.to(torch_device)
    crop = model.cfg.image_size
    log = SkippedLog(skipped_file) if skipped_file is not None else None
    inputs = segmentation_inputs(source, max_skipped_fraction, log, setting="--max-skipped-fraction F")
    images = SegmentationData(
        source, crop, 1, False, scale=tuple(meta["scale"]), device_id=dali_device_id(torch_device), inputs=inputs
    )
    result = evaluate_segmenter(
        model, images, mode, stride or meta["stride"], scales, flip, keep=examples if picture else 0
    )
    if picture:
        comparison_picture(result.pop("examples"), model.cfg.num_classes, source.ignore_index, picture)
    return {**result, "inputs": inputs.summary(), "basis": inputs.basis()}


def comparison_picture(examples: list, classes: int, ignore_index: int, out: Path, height: int = 160) -> None:
    """A PNG with one row per example: the image, the ground truth, the prediction (palette
    colours; ignored pixels black), each scaled to `height` pixels high."""
    from PIL import Image

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(comparison_rows(examples, classes, ignore_index, height)).save(out)


def comparison_rows(examples: list, classes: int, ignore_index: int, height: int = 160) -> np.ndarray:
    """`comparison_picture`'s picture as uint8 [H, W, 3]."""
    from PIL import Image

    colours = palette(classes)
    colours[ignore_index] = 0
    mean, std = np.asarray(IMAGENET_MEAN) * 255, np.asarray(IMAGENET_STD) * 255
    rows = []
    for _, pixels, labels, prediction in examples:
        size = tuple(labels.shape[::-1])
        image = Image.fromarray((pixels.permute(1, 2, 0).numpy() * std + mean).clip(0, 255).astype(np.uint8))
        panels = [image.resize(size, Image.BILINEAR)]
        panels += [Image.fromarray(colours[np.asarray(x, dtype=np.int64)]) for x in (labels, prediction)]
        width = round(size[0] * height / size[1])
        rows.append(np.concatenate([np.asarray(p.resize((width, height), Image.NEAREST)) for p in panels], axis=1))
    widest = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, 4), (0, widest - row.shape[1]), (0, 0)), constant_values=255) for row in rows]
    return np.concatenate(rows, axis=0)


def palette(classes: int) -> np.ndarray:
    """uint8 [256, 3]: distinct colours for the classes (the VOC bit pattern), white for the rest."""
    colours = np.full((256, 3), 255, dtype=np.uint8)
    for c in range(min(classes, 255)):
        r = g = b = 0
        bits = c + 1
        for shift in range(7, -1, -1):
            r |= ((bits >> 0) & 1) << shift
            g |= ((bits >> 1) & 1) << shift
            b |= ((bits >> 2) & 1) << shift
            bits >>= 3
        colours[c] = (r, g, b)
    return colours


def read_rgb(path: Path) -> np.ndarray | str:
    """An image file as RGB [H, W, 3] uint8 (a writable copy: torch takes it as is), or why it cannot be read."""
    from PIL import Image

    reason = precheck(path)
    if reason is not None:
        return reason
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (OSError, ValueError) as error:
        return f"cannot be decoded: {error}"


@torch.no_grad()
def predict_files(
    checkpoint: Path,
    images: list[Path],
    out: Path,
    overlay: bool = False,
    mode: str = "slide",
    device: str = "auto",
    max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
) -> tuple[list[dict], Inputs]:
    """For each image: OUT/<stem>.png, a palette PNG of class indices at the image's size (and
    OUT/<stem>_overlay.jpg, the colours over the image). Returns each image's class shares, and
    the inputs read and skipped (the skipped in OUT/skipped.jsonl)."""
    from PIL import Image

    model, meta = load_segmenter(checkpoint)
    torch_device = choose_device(device)
    model.to(torch_device)
    colours = palette(model.cfg.num_classes)
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    names = [str(path) for path in images]
    folder = os.path.commonpath([os.path.abspath(path.parent) for path in images]) if images else "."
    inputs = Inputs(
        folder, len(images), names.__getitem__, max_skipped_fraction, "--max-skipped-fraction F",
        log=SkippedLog(out / "skipped.jsonl"),
    )  # fmt: skip
    for index, path in enumerate(images):
        stop_point(f"after {index} of the {len(images)} images (their masks are in {out})")
        inputs.tried([index])
        rgb = read_rgb(path)
        if isinstance(rgb, str):
            inputs.skip(index, rgb)
            inputs.check()
            continue
        pixels = eval_view(torch.from_numpy(rgb).to(torch_device), tuple(meta["scale"]))
        classes, crop = model.cfg.num_classes, model.cfg.image_size
        scores = predict_logits(model, pixels, classes, mode=mode, crop=crop, stride=meta["stride"])
        scores = torch.nn.functional.interpolate(scores, size=rgb.shape[:2], mode="bilinear", align_corners=False)
        labels = scores.argmax(1)[0].to(torch.uint8).cpu().numpy()
        mask = Image.fromarray(labels, mode="P")
        mask.putpalette(colours.ravel().tolist())
        mask.save(out / f"{path.stem}.png")
        if overlay:
            blend = (0.5 * rgb + 0.5 * colours[labels]).round().astype(np.uint8)
            Image.fromarray(blend).save(out / f"{path.stem}_overlay.jpg", quality=90)
        shares = np.bincount(labels.ravel(), minlength=model.cfg.num_classes) / labels.size
        top = np.argsort(shares)[::-1][:3]
        summaries.append({"image": str(path), "top": [(meta["class_names"][c], float(shares[c])) for c in top]})
    return summaries, inputs
