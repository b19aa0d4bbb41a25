"""beit's Python API: a token store, its views and samples, and the models, for a user's own code.

    import beit

    store = beit.open_store("runs/store")           # a path or an fsspec URL (s3://...)
    store.grid, store.vocab_size, len(store)         # what it holds
    sample = store.view(0, view=0)                   # one view as it was tokenized, with its tokens
    data = store.dataset(seed=0)                     # a torch IterableDataset for a DataLoader
    model = beit.load_model("runs/pt/checkpoint.pt") # any checkpoint beit reads, as an nn.Module
    tokenizer = beit.load_tokenizer("dvae.safetensors")

Every name here is importable from `beit` itself; see the README's "Use it from Python".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from beit.shared import hf_format
from beit.shared.checkpoint import CheckpointError, adapt_state_dict, load_weights, read_any, read_state_dict
from beit.shared.decode import ImageBatches
from beit.shared.dvae import DVAE, encoder_sha256
from beit.shared.dvae import load_tokenizer as _load_tokenizer
from beit.shared.store import DONE, TokenStore
from beit.shared.views import PARAMS, render_builder
from beit.train.model import BeitClassifier, BeitForMIM, ModelConfig, config_of
from beit.train.pretrain.dataset import MaskedImageDataset
from beit.train.segment.model import BeitSegmenter
from beit.train.segment.predict import segmenter_from

__all__ = [
    "Store", "MaskedImageDataset", "open_store", "load_model", "load_tokenizer",
    "ModelConfig", "BeitForMIM", "BeitClassifier",
]  # fmt: skip


class Store:
    """A token store made by `beit tokenize`, opened read-only (`open_store`)."""

    def __init__(self, location: str | Path):
        self._store = TokenStore.open(location)
        self.location = str(location)
        self._render: ImageBatches | None = None

    def __len__(self) -> int:
        """Images listed, tokenized or not (`done` are the tokenized ones)."""
        return len(self._store)

    def __repr__(self) -> str:
        return (
            f"Store({self.location!r}: {len(self.done)} of {len(self)} images tokenized, {self.views_per_image} "
            f"views each, {self.grid[0]}x{self.grid[1]} tokens of {self.vocab_size})"
        )

    @property
    def done(self) -> np.ndarray:
        """int64 [n]: the store indices of the images that were tokenized (the others failed)."""
        return np.flatnonzero(self._store.status() == DONE)

    def failures(self) -> list[tuple[str, str]]:
        """(key, reason) of every image stage 1 could not read."""
        return self._store.failures()

    @property
    def views_per_image(self) -> int:
        return self._store.views_per_image

    @property
    def grid(self) -> tuple[int, int]:
        """(gh, gw): the token grid of a view, which is also the ViT's patch grid."""
        return self._store.grid

    @property
    def vocab_size(self) -> int:
        return self._store.vocab_size

    @property
    def image_size(self) -> int:
        """The side in pixels of a view as the ViT sees it (`view`'s pixel_values)."""
        return self._store.image_size

    @property
    def patch_size(self) -> int:
        """The ViT patch size the store fixes: image_size / grid."""
        return self.image_size // self.grid[0]

    @property
    def tokenizer_size(self) -> int:
        """The side in pixels of a view as the tokenizer saw it."""
        return self._store.tokenizer_size

    @property
    def tokenizer(self) -> dict:
        """The tokenizer's identity: {kind, sha256 (of its encoder's weights and architecture),
        vocab_size, input_size, grid, downsample, arch} and, when recorded, `path` (where its file
        was when the store was made)."""
        record = self._store.tokenizer_record
        path = self._store.tokenizer_path
        return {**record, "path": str(path)} if path else record

    def is_tokenized_by(self, tokenizer: DVAE) -> bool:
        """Whether `tokenizer` (`load_tokenizer`) is the one this store's tokens come from."""
        return encoder_sha256(tokenizer) == self._store.tokenizer_sha256

    def keys(self, indices=None) -> list[str]:
        """The images' keys (paths relative to the source root, or as listed), all or `indices`."""
        return self._store.keys(None if indices is None else np.sort(np.asarray(indices, dtype=np.int64)))

    def labels(self) -> np.ndarray:
        """int64 [N]: each image's class index into `class_names`, -1 for none."""
        return self._store.labels().astype(np.int64)

    @property
    def class_names(self) -> list[str]:
        return self._store.class_names

    def tokens(self, index: int) -> torch.Tensor:
        """int64 [V, gh, gw]: the token grids of image `index`'s V views."""
        return torch.from_numpy(self._store.tokens(np.array([index]))[0].astype(np.int64))

    def view(self, index: int, view: int = 0, tokenizer_pixels: bool = False) -> dict:
        """View `view` of image `index` exactly as it was tokenized:

            pixel_values  float32 [3, S, S]   rendered at `image_size` from the view's crop, flip
                                              and colour jitter, ImageNet-normalised (as training sees it)
            tokens        int64 [gh, gw]      its cached token ids
            params        dict                the view's parameters (x, y, w, h, flip, brightness,
                                              contrast, saturation)

        With `tokenizer_pixels`, also `tokenizer_pixels`: float32 [3, s, s] in [0, 1], the view
        at the tokenizer's size as the tokenizer saw it (`load_tokenizer(...)(that)` gives `tokens`)."""
        if not 0 <= index < len(self) or self._store.status()[index] != DONE:
            raise IndexError(f"image {index} is not one of the {len(self.done)} tokenized images of {self.location}.")
        if not 0 <= view < self.views_per_image:
            raise IndexError(f"view {view} is not one of the {self.views_per_image} views per image.")
        if self._render is None:
            twin = (self.tokenizer_size, "tokenizer")
            self._render = ImageBatches(render_builder(1, self.image_size, "patches", 1, twin=twin), 1, None, 0)
        params = self._store.view_params(np.array([index]))[0, view]
        items = self._store.items(np.array([index]))
        outputs, kept = self._render.run(items, {"view0": [params]})
        if not kept:
            reason = next(iter(self._render.failed.values()), "unreadable")
            raise ValueError(f"image {index} ({items[0]}) cannot be read now ({reason}): restore the source.")
        out = {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(outputs[0][0])),
            "tokens": self.tokens(index)[view],
            "params": dict(zip(PARAMS, params.tolist(), strict=True)),
        }
        if tokenizer_pixels:
            out["tokenizer_pixels"] = torch.from_numpy(np.ascontiguousarray(outputs[1][0]))
        return out

    def dataset(self, **options) -> MaskedImageDataset:
        """`MaskedImageDataset(location, **options)`: this store's samples for a DataLoader."""
        return MaskedImageDataset(self.location, **options)


def open_store(location: str | Path) -> Store:
    """Open the complete token store at `location` (a folder or an fsspec URL such as s3://b/store)."""
    return Store(location)


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> DVAE:
    """The dVAE tokenizer in a `.safetensors` file from `beit tokenizer convert` or `train`, in eval
    mode on `device`. `tokenizer(pixels)` (or `.tokenize`) maps float [B, 3, s, s] in [0, 1]
    (s = `tokenizer.input_size`, a multiple of 8) to int64 token grids [B, s/8, s/8];
    `.reconstruct(tokens)` maps them back to pixels when the file has the decoder."""
    return _load_tokenizer(Path(path), device)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model in a checkpoint, built with the architecture the checkpoint records or implies,
    in eval mode on `device`:

    - this project's checkpoints: `beit pretrain` -> `BeitForMIM` (forward(pixels [B, 3, H, W],
      mask [B, N] bool) -> logits [M, vocab] of the M masked patches); `beit finetune` ->
      `BeitClassifier` (forward(pixels) -> logits [B, classes]; `.features(pixels)` -> [B, D]);
      `beit segment train` -> `BeitSegmenter` (forward(pixels) -> logits [B, classes, H/4, W/4]);
    - unilm's and timm's BEiT weights (.pth, .bin or .safetensors): the architecture read from the
      tensors' shapes; with an `lm_head` (pre-training) a `BeitForMIM`, else a `BeitClassifier`;
    - a Hugging Face model folder (config.json with model.safetensors or pytorch_model.bin, as the
      hub serves the released checkpoints, or as `beit export --format hf` writes them): the
      architecture from its config (`BeitForMaskedImageModeling` -> `BeitForMIM`,
      `BeitForImageClassification` -> `BeitClassifier`, `BeitForSemanticSegmentation` ->
      `BeitSegmenter` computing what transformers computes).
    """
    path = Path(path)
    if hf_format.is_hf_folder(path):
        return _hf_model(path).to(device).eval()
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder without a config.json: pass a checkpoint file or a Hugging Face folder."
        )
    state, meta = read_any(path)
    if meta is not None:
        kind = meta.get("kind")
        if kind == "segment":
            model = segmenter_from(state, meta, path)
        elif kind in ("pretrain", "finetune"):
            model = (BeitForMIM if kind == "pretrain" else BeitClassifier)(config_of(state, meta)[0])
            load_weights(model, state["model"], source=str(path))
        else:
            raise CheckpointError(
                f"{path} is a {kind} checkpoint, not a model's: pass a pre-training, "
                "fine-tuning or segmentation checkpoint."
            )
        return model.to(device).eval()
    try:
        cfg = config_of(state, None)[0]
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    model = BeitForMIM(cfg) if "lm_head.weight" in state else BeitClassifier(cfg)
    weights, _ = adapt_state_dict(state, model)
    load_weights(model, weights, source=str(path))
    return model.to(device).eval()


def _hf_model(folder: Path) -> nn.Module:
    """The model of a Hugging Face folder (see `load_model`)."""
    config = hf_format.read_config(folder)
    kind = hf_format.kind_of(config)
    cfg = ModelConfig(**hf_format.model_fields(config))
    state = read_state_dict(folder)
    if kind == "segment":
        seg = hf_format.segmenter_fields(config)
        model = BeitSegmenter(cfg, seg["head"], seg["channels"], seg["aux_channels"], tuple(seg["out_indices"]))
        depth = model.cfg.depth  # an exported folder's extra identity block is not part of the model
        state = {k: v for k, v in state.items() if not (k.startswith("blocks.") and int(k.split(".")[1]) >= depth)}
    elif kind in ("pretrain", "finetune"):
        model = (BeitForMIM if kind == "pretrain" else BeitClassifier)(cfg)
    else:
        raise CheckpointError(
            f"{folder} is a BeitModel (a backbone without a head): pass it as --init to a command, "
            "which adds the head it trains."
        )
    load_weights(model, state, source=str(folder))
    return model
