"""Semantic segmentation data sets: split readers for ADE20K, Pascal VOC 2012, Cityscapes and a
plain folder layout (`read_segmentation` gives a `SegmentationSource`: images, masks, classes).

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
Masks are read with PIL. An image (or its mask) whose header cannot be read is left out of the
split and kept in `unreadable` with the reason; a missing mask or one of another size is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from beit.shared.decode import precheck
from beit.shared.images import IMAGE_SUFFIXES

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
    unreadable: dict[str, str] = field(default_factory=dict)  # listed images left out: path -> why

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
    pairs, sizes, unreadable = [], [], {}
    for pair in zip(images, masks, keys, strict=True):
        size = _pair_size(pair[0], pair[1], format)
        if isinstance(size, str):
            unreadable[str(pair[0])] = size
        else:
            pairs.append(pair)
            sizes.append(size)
    images, masks, keys = (list(column) for column in zip(*pairs, strict=True)) if pairs else ([], [], [])
    return SegmentationSource(
        format, root, images, masks, keys, len(names), list(names), reduce, ignore, sizes, unreadable
    )


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


def _header_size(path: Path) -> tuple[int, int] | str:
    """(height, width) of an image from its header alone, EXIF orientation applied as the decoder
    does; or why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    reason = precheck(path)
    if reason is not None:
        return reason
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.format in ("JPEG", "MPO") and image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
    except (OSError, UnidentifiedImageError) as error:
        return f"cannot be read: {error}"
    return height, width


def _pair_size(image: Path, mask: Path, format: str) -> tuple[int, int] | str:
    """The (height, width) an image shares with its mask, or why the pair cannot be read."""
    if not mask.is_file():
        hint = f"; {TRAIN_IDS_HINT}" if format == "cityscapes" else ""
        raise ValueError(f"{image} has no mask: {mask} does not exist; add it or remove the image{hint}.")
    size, mask_size = _header_size(image), _header_size(mask)
    if isinstance(size, str):
        return size
    if isinstance(mask_size, str):
        return f"its mask {mask}: {mask_size}"
    if size != mask_size:
        raise ValueError(
            f"{mask} is {mask_size[1]}x{mask_size[0]} but its image {image} is {size[1]}x{size[0]}: "
            "a mask must label every pixel of its image; pair them correctly or re-export the mask."
        )
    return size


# --- augmentation: per sample, in torch, on the decoded image's device ---------------------------------
