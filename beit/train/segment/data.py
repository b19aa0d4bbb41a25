"""Semantic segmentation data: split readers for ADE20K, Pascal VOC 2012, Cityscapes and a plain
folder layout, and the augmentation released with BEiT (mmseg's ADE20K pipeline) that turns them
into batches.

    train = read_segmentation(DATA, "train")            # the layout detected, sizes checked
    data = SegmentationData(train, crop=512, batch_size=16, train=True, seed=0)
    pixels, labels = data.batch(step)                    # [B, 3, 512, 512] normalised, [B, 512, 512] int64
    val = SegmentationData(read_segmentation(DATA, "val"), crop=512, batch_size=4, train=False)
    for key, pixels, labels in val.images():             # [1, 3, h, w] at the base scale, [H, W] as stored
        ...

Layouts (DATA is the folder named first, or one that holds it):

    ade20k      ADEChallengeData2016/images/{training,validation}/*.jpg, annotations/<same>/*.png;
                150 classes, label 0 ("other") ignored and k -> k - 1 (reduce_zero_label)
    voc         VOCdevkit/VOC2012/JPEGImages/*.jpg, SegmentationClass/*.png (palette PNGs, read as
                indices), ImageSets/Segmentation/{train,val}.txt; 21 classes
    cityscapes  leftImg8bit/{train,val}/<city>/*_leftImg8bit.png with
                gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png; 19 classes
    folder      images/<split>/**/<name>.<ext> with annotations/<split>/**/<name>.png (split
                training|train, validation|val); classes from --num-classes or DATA/classes.json
                {"classes": [...], "ignore_index": 255, "reduce_zero_label": false}

A mask holds one class index a pixel; the ignore index (255) counts in neither loss nor metrics.

Training views, as mmseg: resize keeping the aspect ratio, the long side at most scale[0] * r and
the short side at most scale[1] * r, r uniform in ratio_range (mmcv's rescale rule); a crop x crop
window, redrawn up to 10 times while one class covers `cat_max_ratio` or more of its labelled
pixels (or it holds one class); horizontal flip (p 0.5); photometric distortion (brightness +-32,
contrast 0.5-1.5 before or after saturation 0.5-1.5 and hue +-18 OpenCV units, each p 0.5);
ImageNet normalisation; padding to crop with 0 (pixels) and the ignore index (labels).
Evaluation views: resized to the base scale, normalised; labels kept at the original size.

DALI decodes the images (on the GPU when there is one); the per-sample ops run in torch where the
decoded image is. Masks are read with PIL and resized with nearest neighbour only, OpenCV's rule
(source index floor(i * in / out)), so labels match mmseg's. Images are resized bilinearly
(align_corners=False, no antialiasing: cv2.INTER_LINEAR's sampling) and kept in float, where
mmseg rounds to uint8 after each step and shifts hue and saturation in OpenCV's 8-bit HSV.
Every random draw comes from np.random.default_rng([seed, epoch, image index]): any rank, restart
or resumed run draws the same views of an image.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from beit.shared.decode import ImageBatches, as_tensor, pipeline_builder
from beit.shared.images import IMAGE_SUFFIXES
from beit.shared.prefetch import ahead, prefetch
from beit.shared.views import imagenet_stats

ADE20K_CLASSES = (
    "wall building sky floor tree ceiling road bed windowpane grass cabinet sidewalk person earth door table "
    "mountain plant curtain chair car water painting sofa shelf house sea mirror rug field armchair seat fence "
    "desk rock wardrobe lamp bathtub railing cushion base box column signboard chest_of_drawers counter sand "
    "sink skyscraper fireplace refrigerator grandstand path stairs runway case pool_table pillow screen_door "
    "stairway river bridge bookcase blind coffee_table toilet flower book hill bench countertop stove palm "
    "kitchen_island computer swivel_chair boat bar arcade_machine hovel bus towel light truck tower chandelier "
    "awning streetlight booth television_receiver airplane dirt_track apparel pole land bannister escalator "
    "ottoman bottle buffet poster stage van ship fountain conveyer_belt canopy washer plaything swimming_pool "
    "stool barrel basket waterfall tent bag minibike cradle oven ball food step tank trade_name microwave pot "
    "animal bicycle lake dishwasher screen blanket sculpture hood sconce vase traffic_light tray ashcan fan pier "
    "crt_screen plate monitor bulletin_board shower radiator glass clock flag"
)
VOC_CLASSES = (
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person "
    "pottedplant sheep sofa train tvmonitor"
)
CITYSCAPES_CLASSES = (
    "road sidewalk building wall fence pole traffic_light traffic_sign vegetation terrain sky person rider car "
    "truck bus train motorcycle bicycle"
)
# format: (class names, reduce_zero_label by default)
STANDARD = {
    "ade20k": ([n.replace("_", " ") for n in ADE20K_CLASSES.split()], True),
    "voc": (VOC_CLASSES.split(), False),
    "cityscapes": ([n.replace("_", " ") for n in CITYSCAPES_CLASSES.split()], False),
}
LAYOUTS = {
    "ade20k": "ADEChallengeData2016/images|annotations/{training,validation}",
    "voc": "VOCdevkit/VOC2012 with JPEGImages, SegmentationClass and ImageSets/Segmentation/{train,val}.txt",
    "cityscapes": "leftImg8bit/{train,val}/<city> and gtFine/{train,val}/<city> (*_gtFine_labelTrainIds.png)",
    "folder": "images/<split> and annotations/<split> (split training|train, validation|val)",
}
MARKERS = {
    "ade20k": ("images", "annotations"),
    "voc": ("JPEGImages", "SegmentationClass"),
    "cityscapes": ("leftImg8bit", "gtFine"),
    "folder": ("images", "annotations"),
}
SPLIT_FOLDERS = {"train": ("training", "train"), "val": ("validation", "val")}
TRAIN_IDS_HINT = (
    "cityscapesscripts' createTrainIdLabelImgs writes them (CITYSCAPES_DATASET=DATA csCreateTrainIdLabelImgs)"
)


@dataclass
class SegmentationSource:
    """One split of a segmentation data set: image files and their masks, in a fixed order."""

    format: str  # "ade20k" | "voc" | "cityscapes" | "folder"
    root: Path
    images: list[Path]
    masks: list[Path]
    keys: list[str]  # the stable name of each image (its path from the split's folder, no suffix)
    num_classes: int
    class_names: list[str]
    reduce_zero_label: bool  # mask value 0 is "unlabelled": ignored, and k -> k - 1
    ignore_index: int
    sizes: list[tuple[int, int]] = field(default_factory=list)  # each image's (height, width), EXIF applied

    def load_mask(self, path: Path) -> np.ndarray:
        """The mask at `path` as class indices [H, W] uint8 (palette PNGs read as indices,
        reduce_zero_label applied); a value that is neither a class nor the ignore index is an error."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                raw = np.asarray(image)
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"{path} is not a readable mask ({error}): replace it.") from None
        if raw.ndim != 2 or raw.dtype.kind not in "biu":
            raise ValueError(
                f"{path} is a colour mask: save class indices as a single-channel or palette PNG, one index a pixel."
            )
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise ValueError(f"{path} holds values outside 0-255: save class indices as an 8-bit PNG.")
        raw = raw.astype(np.uint8)
        mask = raw
        if self.reduce_zero_label:
            mask = raw - np.uint8(1)  # 0 wraps to 255 and is set to ignore next
            mask[(raw == 0) | (raw == self.ignore_index)] = self.ignore_index
        bad = (mask >= self.num_classes) & (mask != self.ignore_index)
        if bad.any():
            value = int(raw[bad].max())
            reduced = " (reduce_zero_label: stored k is class k - 1)" if self.reduce_zero_label else ""
            raise ValueError(
                f"{path} holds label {value}, outside the {self.num_classes} classes{reduced} and not the ignore "
                f"index {self.ignore_index}: fix the mask, or pass the right --num-classes / --reduce-zero-label / "
                "--ignore-index."
            )
        return mask


def read_segmentation(
    data: Path,
    split: str,
    format: str | None = None,
    num_classes: int = 0,
    reduce_zero_label: bool | None = None,
    ignore_index: int | None = None,
) -> SegmentationSource:
    """The `split` ("train" | "val") of the segmentation data set at `data`, in `format` (detected
    from the layout when None), every image paired with a mask of its size (checked from the file
    headers). `num_classes` (folder layout), `reduce_zero_label` and `ignore_index` (255) override
    the format's conventions or classes.json."""
    data = Path(data)
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"split {split!r} is not one of train, val.")
    if not data.is_dir():
        raise ValueError(f"{data} is not a folder: pass the data set's folder.")
    if format is None:
        found = [(name, _root(data, name, detecting=True)) for name in LAYOUTS]
        format, root = next(((name, root) for name, root in found if root is not None), (None, None))
        if root is None:
            layouts = "; ".join(f"{name}: {layout}" for name, layout in LAYOUTS.items())
            raise ValueError(
                f"{data} is none of the segmentation layouts ({layouts}): check the path or pass --format."
            )
    elif format not in LAYOUTS:
        raise ValueError(f"format {format!r} is not one of {', '.join(LAYOUTS)}.")
    else:
        root = _root(data, format, detecting=False)
        if root is None:
            raise ValueError(
                f"{data} does not have the {format} layout ({LAYOUTS[format]}): check the path or --format."
            )
    images, masks, keys, where = _LISTERS[format](root, split)
    if not images:
        state = "holds no images" if where.exists() else "does not exist"
        raise ValueError(f"the {split} split is empty: {where} {state}; add its images or check the path.")
    if format == "folder":
        names, reduce, ignore = _folder_classes(root, num_classes)
    else:
        names, reduce = STANDARD[format]
        ignore = 255
        if num_classes and num_classes != len(names):
            raise ValueError(f"{format} has {len(names)} classes, not {num_classes}: drop --num-classes.")
    reduce = reduce if reduce_zero_label is None else reduce_zero_label
    ignore = ignore if ignore_index is None else ignore_index
    if not len(names) <= ignore <= 255:
        raise ValueError(
            f"the ignore index {ignore} must lie in {len(names)}-255, outside the {len(names)} classes: 255 is usual."
        )
    sizes = [_pair_size(image, mask, format) for image, mask in zip(images, masks, strict=True)]
    return SegmentationSource(format, root, images, masks, keys, len(names), list(names), reduce, ignore, sizes)


def _root(data: Path, format: str, detecting: bool) -> Path | None:
    """The folder of `format` at or inside `data`, found by its marker folders, or None. Detection
    names ADE20K only by its folder name (its layout is also the folder layout's)."""
    candidates = {
        "ade20k": [data / "ADEChallengeData2016", data],
        "voc": [data, data / "VOC2012", data / "VOCdevkit" / "VOC2012"],
    }.get(format, [data])
    for root in candidates:
        if all((root / marker).is_dir() for marker in MARKERS[format]):
            if format == "ade20k" and detecting and root.name != "ADEChallengeData2016":
                continue
            return root
    return None


def _list_paired(root: Path, split: str) -> tuple[list[Path], list[Path], list[str], Path]:
    """ADE20K and folder: images/<split>/**/<name>.<ext> with annotations/<split>/**/<name>.png."""
    name = next((n for n in SPLIT_FOLDERS[split] if (root / "images" / n).is_dir()), "|".join(SPLIT_FOLDERS[split]))
    folder = root / "images" / name
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    relative = [p.relative_to(folder).with_suffix("") for p in images]
    masks = [root / "annotations" / name / f"{r.as_posix()}.png" for r in relative]
    return images, masks, [r.as_posix() for r in relative], folder


def _list_voc(root: Path, split: str) -> tuple[list[Path], list[Path], list[str], Path]:
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise ValueError(f"{listing} does not exist: VOC's {split} split is listed there, one image id a line.")
    keys = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    images = [root / "JPEGImages" / f"{key}.jpg" for key in keys]
    for image in images:
        if not image.is_file():
            raise ValueError(f"{listing} lists {image.stem} but {image} does not exist: restore it or drop the line.")
    return images, [root / "SegmentationClass" / f"{key}.png" for key in keys], keys, listing


def _list_cityscapes(root: Path, split: str) -> tuple[list[Path], list[Path], list[str], Path]:
    folder = root / "leftImg8bit" / split
    images = sorted(folder.glob("*/*_leftImg8bit.png"))
    keys = [f"{p.parent.name}/{p.name.removesuffix('_leftImg8bit.png')}" for p in images]
    masks = [root / "gtFine" / split / f"{key}_gtFine_labelTrainIds.png" for key in keys]
    if images and not any((root / "gtFine" / split).glob("*/*_gtFine_labelTrainIds.png")):
        raise ValueError(f"{root / 'gtFine' / split} has no *_gtFine_labelTrainIds.png masks: {TRAIN_IDS_HINT}.")
    return images, masks, keys, folder


_LISTERS = {"ade20k": _list_paired, "folder": _list_paired, "voc": _list_voc, "cityscapes": _list_cityscapes}


def _folder_classes(root: Path, num_classes: int) -> tuple[list[str], bool, int]:
    """(class names, reduce_zero_label, ignore index) of a folder layout: DATA/classes.json, or
    `num_classes` unnamed classes."""
    file = root / "classes.json"
    settings: dict = {}
    if file.is_file():
        try:
            settings = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{file} is not valid JSON ({error}): fix it.") from None
        unknown = sorted(set(settings) - {"classes", "ignore_index", "reduce_zero_label"})
        if unknown or not isinstance(settings.get("classes"), list) or not settings["classes"]:
            raise ValueError(
                f"{file} must hold a non-empty 'classes' list and optionally 'ignore_index' and "
                f"'reduce_zero_label'{' (unknown: ' + ', '.join(unknown) + ')' if unknown else ''}."
            )
    names = [str(name) for name in settings.get("classes", [])]
    if names and num_classes and num_classes != len(names):
        raise ValueError(f"{file} names {len(names)} classes but --num-classes is {num_classes}: drop one or fix it.")
    if not names:
        if num_classes <= 0:
            raise ValueError(f"{root} does not say how many classes it has: pass --num-classes N or write {file}.")
        names = [str(i) for i in range(num_classes)]
    return names, bool(settings.get("reduce_zero_label", False)), int(settings.get("ignore_index", 255))


def _header_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image from its header alone, EXIF orientation applied as the decoder does."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.format in ("JPEG", "MPO") and image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"{path} is not a readable image ({error}): replace or remove it.") from None
    return height, width


def _pair_size(image: Path, mask: Path, format: str) -> tuple[int, int]:
    if not mask.is_file():
        hint = f"; {TRAIN_IDS_HINT}" if format == "cityscapes" else ""
        raise ValueError(f"{image} has no mask: {mask} does not exist; add it or remove the image{hint}.")
    size, mask_size = _header_size(image), _header_size(mask)
    if size != mask_size:
        raise ValueError(
            f"{mask} is {mask_size[1]}x{mask_size[0]} but its image {image} is {size[1]}x{size[0]}: "
            "a mask must label every pixel of its image; pair them correctly or re-export the mask."
        )
    return size


# --- augmentation: per sample, in torch, on the decoded image's device ---------------------------------


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


def decode_builder(threads: int = 0):
    """Pipeline factory for `ImageBatches`: decoded RGB HWC uint8, padded with zeros to the
    batch's largest height and width so that images of any size make one batch."""
    from nvidia.dali import fn

    return pipeline_builder(lambda images, device_id: fn.pad(images, axes=(0, 1), fill_value=0), threads)


class SegmentationData:
    """Training batches of `source` in a deterministic per-epoch order, sharded by rank (whole
    batches only); or, for evaluation, this rank's images one at a time (`images`)."""

    def __init__(
        self,
        source: SegmentationSource,
        crop: int,
        batch_size: int,
        train: bool,
        seed: int = 0,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        threads: int = 0,
        rank: int = 0,
        world: int = 1,
        device_id: int | None = None,
        photometric: bool = True,
    ):
        self.source, self.crop, self.batch_size, self.train = source, crop, batch_size, train
        self.seed, self.scale, self.ratio_range, self.cat_max_ratio = (
            seed,
            tuple(scale),
            tuple(ratio_range),
            cat_max_ratio,
        )
        self.rank, self.world, self.photometric = rank, world, photometric
        self.batches = ImageBatches(decode_builder(threads), batch_size, device_id, seed)  # .failed: files set aside
        self._order: tuple[int, np.ndarray] = (-1, np.arange(0))
        self._stream = None
        n = len(source.images)
        # evaluation: a step is one of this rank's images
        self.steps_per_epoch = n // (batch_size * world) if train else len(range(rank, n, world))
        if train and self.steps_per_epoch == 0:
            raise ValueError(
                f"{source.root} has {n} training images, fewer than one batch of {batch_size} x {world}: "
                "lower --batch-size."
            )

    def indices(self, step: int) -> np.ndarray:
        """The source indices of this rank's share of training batch `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:  # drawn once per epoch, not per batch
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.source.images)))
        start = within * self.batch_size * self.world + self.rank * self.batch_size
        return self._order[1][start : start + self.batch_size]

    def _decoded(self, indices: np.ndarray) -> list[tuple[int, torch.Tensor]]:
        """(index, image [H, W, 3] uint8) of each of `indices` that decodes, on DALI's device."""
        outputs, kept = self.batches.run([self.source.images[i] for i in indices])
        if not kept:
            return []
        padded = as_tensor(outputs[0])
        out = []
        for position, k in enumerate(kept):
            height, width = self.source.sizes[indices[k]]
            out.append((int(indices[k]), padded[position, :height, :width]))
        return out

    @contextlib.contextmanager
    def _side_stream(self, device: torch.device):
        """On a GPU, this thread's augmentation kernels run on a side stream it waits for, so the
        trainer's stream never does (as `ImageBatches` copies its outputs)."""
        if device.type != "cuda":
            yield
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self._stream):
            yield
        self._stream.synchronize()

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch `step`: (pixels [B, 3, crop, crop] float32 on DALI's device, labels
        [B, crop, crop] int64 on the CPU, page-locked for a GPU trainer). B is less than batch_size
        only when files fail to decode (`batches.failed`)."""
        chosen = self.indices(step)
        epoch = step // self.steps_per_epoch
        decoded = self._decoded(chosen)
        pin = self.batches.device_id is not None
        if not decoded:
            return torch.zeros(0, 3, self.crop, self.crop), torch.zeros(0, self.crop, self.crop, dtype=torch.long)
        pixels, labels = [], []
        device = decoded[0][1].device
        with self._side_stream(device):
            for index, image in decoded:
                rng = np.random.default_rng([self.seed, epoch, index])
                mask = self.source.load_mask(self.source.masks[index])
                view, label = train_view(
                    image, mask, rng, self.crop, self.scale, self.ratio_range, self.cat_max_ratio,
                    self.source.ignore_index, self.photometric,
                )  # fmt: skip
                pixels.append(view)
                labels.append(label)
            stacked = torch.stack(pixels)
        if device.type == "cuda":
            stacked.record_stream(torch.cuda.default_stream(device))
        return stacked, as_tensor(np.stack(labels).astype(np.int64), pin)

    def stream(self, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches from `start_step` on, prepared ahead in a thread (a resumed run draws
        what an uninterrupted one would have: the draws are keyed by seed, epoch and image)."""
        return prefetch(self.batch, start_step)

    def _evaluated(self, indices: np.ndarray) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        out = []
        for index, image in self._decoded(indices):
            with self._side_stream(image.device):
                pixels = eval_view(image, self.scale)
            if pixels.is_cuda:
                pixels.record_stream(torch.cuda.default_stream(pixels.device))
            labels = torch.from_numpy(self.source.load_mask(self.source.masks[index]).astype(np.int64))
            out.append((self.source.keys[index], pixels, labels))
        return out

    def images(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """This rank's evaluation images (every `world`-th from `rank`), one at a time, decoded
        ahead in a thread: (key, pixels [1, 3, h, w] float32 resized to the base scale and
        normalised, labels [H, W] int64 at the original size). Failed files are left out
        (`batches.failed`)."""
        shard = np.arange(self.rank, len(self.source.images), self.world)
        chunks = [shard[i : i + self.batch_size] for i in range(0, len(shard), self.batch_size)]
        for chunk in ahead(chunks, self._evaluated):
            yield from chunk
