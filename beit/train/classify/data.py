"""Classification data: labelled splits and the DALI pipeline that turns them into batches, for
fine-tuning, linear probes and evaluation alike.

    train, val = read_splits(DATA)                   # ImageFolder trees, or a labelled token store
    data = ClassificationData(train, size=224, batch_size=64, train=True, seed=0)
    pixels, labels = data.batch(step)                 # [B, 3, size, size] normalised, [B] int64

DATA is a folder with ImageFolder trees train/ and val/ (the same class sub-folders), or a
token store made from labelled images (its tokenized images and labels, `held_out` of each class
as val), so a tokenized data set is fine-tuned without re-reading its source listing. Training
views: RandomResizedCrop to the model's size (bicubic), flip, RandAugment (n 2, m 9; DALI),
normalised. Evaluation views: the shorter side resized to size / 0.875, centre crop. Batches
come in a deterministic per-epoch order (a permutation drawn from (seed, epoch); val keeps its
order), sharded by rank. A new data source plugs in as one more split reader returning `Source`s.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch

from beit.shared.counter import counter_key
from beit.shared.decode import ImageBatches, as_tensor, pipeline_builder, require_dali
from beit.shared.images import Source, read_source
from beit.shared.inputs import MAX_SKIPPED_FRACTION, Inputs, SkippedLog, source_name
from beit.shared.prefetch import prefetch
from beit.shared.store import DONE, StoreItems, TokenStore
from beit.shared.views import IMAGENET_MEAN, IMAGENET_STD

STORE_URLS = ("s3://", "gs://", "gcs://", "file://")


def read_store_splits(location: str, held_out: float, seed: int, source_root: str = "") -> tuple[Source, Source]:
    """A token store's tokenized images and labels, split into train and a held-out val share
    (per class, seeded), so a tokenized data set is fine-tuned without listing its source again.
    The images are what `TokenStore.items` gives: the store's copies when it embeds them, else
    the original files."""
    store = TokenStore.open(location)
    if source_root:
        store.use_source_root(source_root)
    labels = store.labels()
    done = np.flatnonzero((store.status() == DONE) & (labels >= 0))
    names = store.class_names
    if not len(done) or not names:
        raise ValueError(
            f"{location} has no labelled images: tokenize an ImageFolder tree (or a labelled list) "
            "to fine-tune from it."
        )
    store.check_sources(done[:16])
    rng = np.random.default_rng([seed, 7])
    val_mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels[done]):
        members = done[labels[done] == label]
        count = max(1, round(len(members) * held_out)) if len(members) > 1 else 0
        val_mask[rng.choice(members, size=count, replace=False)] = True
    keys = store.keys()
    splits = []
    for chosen in (done[~val_mask[done]], done[val_mask[done]]):
        digest = hashlib.sha256(f"{store.source_fingerprint}\n".encode() + chosen.astype("<i8").tobytes()).hexdigest()
        splits.append(
            Source(
                "store",
                store.source_root,
                StoreItems(store, chosen),  # read a batch at a time: no copy of the images in memory
                [keys[i] for i in chosen],
                [int(labels[i]) for i in chosen],
                names,
                known_fingerprint=digest,
            )
        )
    return splits[0], splits[1]


def read_splits(data: Path | str, held_out: float = 0.1, seed: int = 0, source_root: str = "") -> tuple[Source, Source]:
    """DATA/train and DATA/val as ImageFolder trees with the same classes, checked; or, when
    DATA is a token store, its labelled images with a held-out share as val."""
    if (Path(data) / "zarr.json").is_file() or str(data).startswith(STORE_URLS):
        return read_store_splits(str(data), held_out, seed, source_root)
    data = Path(data)
    if not data.is_dir():
        raise ValueError(f"{data} does not exist: pass a folder with train/ and val/ ImageFolder trees.")
    splits = []
    for name in ("train", "val"):
        folder = data / name
        if not folder.is_dir():
            raise ValueError(
                f"{data} has no {name}/ folder: fine-tuning data is DATA/train/<class>/... and DATA/val/<class>/..."
            )
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if not any(f.is_file() for f in sub.rglob("*")):
                raise ValueError(f"class folder {sub} is empty: add its images or remove it.")
        source = read_source(folder)
        if source.kind != "imagefolder":
            raise ValueError(f"{folder} is not an ImageFolder tree: put each image in a class sub-folder.")
        splits.append(source)
    train, val = splits
    extra = sorted(set(val.class_names) - set(train.class_names))
    if extra:
        raise ValueError(
            f"{data}/val has classes that train/ lacks ({', '.join(extra[:5])}): fine-tune on every class you evaluate."
        )
    if val.class_names != train.class_names:  # val may lack some classes: use train's indices
        relabel(val, train.class_names)
    return train, val


def relabel(source: Source, class_names: list[str]) -> None:
    """Give `source` the label indices of `class_names` (a model's classes), refusing a class it lacks."""
    unknown = sorted(set(source.class_names) - set(class_names))
    if unknown:
        raise ValueError(
            f"{source.root} has classes the checkpoint does not know ({', '.join(unknown[:5])}): "
            "evaluate on its classes."
        )
    index = {name: i for i, name in enumerate(class_names)}
    source.labels = [index[source.class_names[label]] for label in source.labels]
    source.class_names = list(class_names)


def classification_builder(size: int, train: bool, randaugment: bool, threads: int):
    """Pipeline factory for `ImageBatches`: the training view (random resized crop, flip,
    RandAugment) or the evaluation view (resize, centre crop), normalised float CHW."""
    require_dali()
    from nvidia.dali import fn, types

    def graph(images, device_id):
        if train:
            images = fn.random_resized_crop(images, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
            images = fn.flip(images, horizontal=fn.random.coin_flip())
            if randaugment:
                import warnings

                from nvidia.dali.auto_aug import rand_augment

                with warnings.catch_warnings():  # DALI's own RandAugment calls its deprecated aliases
                    warnings.simplefilter("ignore", DeprecationWarning)
                    images = rand_augment.rand_augment(images, n=2, m=9)
            crop = None
        else:
            images = fn.resize(
                images, resize_shorter=round(size / 0.875), interp_type=types.INTERP_CUBIC, antialias=True
            )
            crop = [size, size]
        return fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            crop=crop,
            mean=[255 * m for m in IMAGENET_MEAN],
            std=[255 * s for s in IMAGENET_STD],
        )

    return pipeline_builder(graph, threads, conditionals=train and randaugment)


def classify_inputs(
    source: Source,
    split: str = "",
    limit: float = MAX_SKIPPED_FRACTION,
    log: SkippedLog | None = None,
    setting: str = "--set max_skipped_fraction=F",
) -> Inputs:
    """The `Inputs` of a split: named by its folder, skipped files into `log`."""
    names = source_name(source.files, source.keys)
    return Inputs(str(source.root), len(source.files), names, limit, setting, split, log)


class ClassificationData:
    """Batches of (pixels, labels) of `source` in a deterministic per-epoch order, sharded by rank
    (`train`: random views, whole batches only; else: evaluation views, every image once)."""

    def __init__(
        self,
        source: Source,
        size: int,
        batch_size: int,
        train: bool,
        seed: int = 0,
        randaugment: bool = True,
        threads: int = 0,
        rank: int = 0,
        world: int = 1,
        device_id: int | None = None,
        inputs: Inputs | None = None,
    ):
        self.source, self.batch_size, self.train = source, batch_size, train
        # what was read and skipped (`classify_inputs` makes one with a limit and a file)
        self.inputs = inputs or classify_inputs(source)
        self.seed, self.rank, self.world = seed, rank, world
        self.batches = ImageBatches(
            classification_builder(size, train, randaugment, threads), batch_size, device_id, seed + rank
        )
        n = len(source.files)
        self._order: tuple[int, np.ndarray] = (-1, np.arange(n))
        self.steps_per_epoch = n // (batch_size * world) if train else math.ceil(n / (batch_size * world))
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{source.root} has {n} images, fewer than one batch of {batch_size} x {world}: lower --batch-size."
            )

    def indices(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.steps_per_epoch)
        if self.train and self._order[0] != epoch:  # drawn once per epoch, not per batch; val keeps its order
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.source.files)))
        order = self._order[1]
        start = within * self.batch_size * self.world + self.rank * self.batch_size
        return order[start : start + self.batch_size]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = self.indices(step)
        if not len(chosen):
            return torch.zeros(0, 3, 1, 1), torch.zeros(0, dtype=torch.long)
        files = self.source.take(chosen)
        outputs, kept = self.batches.run(files)
        self.inputs.account(chosen, files, kept, self.batches.failed)  # a file that fails is skipped, not fatal
        if self.train and not kept:
            self.inputs.refuse_empty_batch(len(chosen))
        pin = self.batches.device_id is not None  # a GPU trainer's non-blocking copy needs page-locked memory
        labels = as_tensor(np.asarray([self.source.labels[chosen[k]] for k in kept], dtype=np.int64), pin)
        return (as_tensor(outputs[0], pin) if kept else torch.zeros(0, 3, 1, 1)), labels

    def stream(self, start_step: int):
        """Batches from `start_step` on, prepared ahead in a thread."""
        if start_step:  # a resumed run: fresh augmentation draws, not the first steps' again
            self.batches.reseed(int(counter_key(self.seed, self.rank, start_step) % 2**31))
        return prefetch(self.batch, start_step)
