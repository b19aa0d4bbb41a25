"""`beit probe`: linear probing of a frozen pre-trained BEiT.

    beit probe DATA --init runs/pt/checkpoint.pt --model base --layer 9
    beit probe DATA --init runs/pt/checkpoint.pt --model base --all-layers

Features of every image of DATA/train and DATA/val (evaluation view: shorter side to
size / 0.875, centre crop) are taken once from the frozen backbone: at the output of the chosen
block, the concatenation of the cls token and the mean of the patch tokens (as the BEiT paper's
probe). Each layer's features are standardised with the training set's statistics and a linear
classifier is trained on them (AdamW, full batch, cosine lr); top-1 on val is reported. An image
that cannot be read is skipped and named with its reason (the probe writes no file).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from beit.shared.checkpoint import load_pretrained
from beit.shared.dist import choose_device, dali_device_id
from beit.shared.inputs import MAX_SKIPPED_FRACTION
from beit.shared.preempt import stop_point
from beit.train.classify.data import ClassificationData, classify_inputs, read_splits
from beit.train.model import ARCHITECTURE, BeitClassifier, ModelConfig


@dataclass
class ProbeConfig:
    # model settings an --init checkpoint fixes unless set
    ARCHITECTURE_FROM_INIT: ClassVar[tuple[str, ...]] = ("image_size", *ARCHITECTURE)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="base"))
    device: str = "auto"
    # stop when more of the images tried than this share cannot be read (once 10 are): a wrong path or mount
    max_skipped_fraction: float = MAX_SKIPPED_FRACTION


@torch.no_grad()
def layer_features(
    model: BeitClassifier, data: ClassificationData, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """[depth, N, 2D] features (cls ++ mean patch token per block) and [N] labels."""
    model.eval()
    features, labels = [], []
    for step in range(data.steps_per_epoch):
        stop_point(f"after {data.inputs.tried_count} of the {data.inputs.listed} images of {data.source.root}")
        pixels, y = data.batch(step)
        if not len(y):
            continue
        layers = model.encode(pixels.to(device), return_layers=True)
        features.append(torch.stack([torch.cat([x[:, 0], x[:, 1:].mean(1)], dim=-1) for x in layers]).float().cpu())
        labels.append(y)
    return torch.cat(features, dim=1), torch.cat(labels)


def train_linear(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    classes: int,
    epochs: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> float:
    """Top-1 on val of a linear classifier trained on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[1], classes)
    torch.nn.init.normal_(head.weight, std=0.01, generator=generator)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for epoch in range(epochs):
        stop_point(f"at epoch {epoch} of {epochs} of the linear classifier")
        for entry in optimizer.param_groups:
            entry["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        loss = F.cross_entropy(head(train_x), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (head(val_x).argmax(1) == val_y).float().mean().item()


def probe(
    data_dir: Path,
    init: str,
    model_cfg: ModelConfig,
    layers: list[int] | None,
    batch_size: int = 64,
    epochs: int = 300,
    threads: int = 0,
    device: str = "auto",
    max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
) -> dict:
    """{layer (1-based block): val top-1}; `layers` None = every block. "inputs": each split's
    counts and skipped images."""
    train_source, val_source = read_splits(data_dir)
    classes = len(train_source.class_names)
    model = BeitClassifier(ModelConfig(**{**model_cfg.__dict__, "num_classes": classes}))
    notes = [] if init == "none" else load_pretrained(model, Path(init))
    torch_device = choose_device(device)
    model.to(torch_device)
    depth = model.cfg.depth
    chosen = layers or list(range(1, depth + 1))
    bad = [k for k in chosen if not 1 <= k <= depth]
    if bad:
        raise ValueError(f"--layer {bad[0]} is outside the model's blocks 1..{depth}.")
    size, device_id = model.cfg.image_size, dali_device_id(torch_device)
    train, val = (
        ClassificationData(
            source, size, batch_size, False, threads=threads, device_id=device_id,
            inputs=classify_inputs(source, split, max_skipped_fraction),
        )
        for split, source in (("train", train_source), ("val", val_source))
    )  # fmt: skip
    train_x, train_y = layer_features(model, train, torch_device)
    val_x, val_y = layer_features(model, val, torch_device)
    accuracy = {k: train_linear(train_x[k - 1], train_y, val_x[k - 1], val_y, classes, epochs) for k in chosen}
    return {
        "accuracy": accuracy,
        "notes": notes,
        "train_images": len(train_y),
        "val_images": len(val_y),
        "inputs": {"train": train.inputs.summary(), "val": val.inputs.summary()},
    }
