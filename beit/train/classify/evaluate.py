"""`beit evaluate`: top-1, top-5, loss and per-class accuracy of a fine-tuned classifier on a
labelled split, and the evaluation fine-tuning runs after its epochs.

    beit evaluate runs/ft/best.pt DATA/val --per-class [--json figures.json]

A file that cannot be read is skipped and counted: the figures say what they were computed over,
and with --json the skipped files and their reasons go beside it (figures.skipped.jsonl).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from beit.shared.checkpoint import load_checkpoint
from beit.shared.dist import choose_device, dali_device_id
from beit.shared.images import read_source
from beit.shared.inputs import MAX_SKIPPED_FRACTION, SkippedLog
from beit.shared.preempt import stop_point
from beit.train.classify.data import ClassificationData, classify_inputs, relabel
from beit.train.model import BeitClassifier, ModelConfig


@torch.no_grad()
def evaluate_classifier(model: BeitClassifier, data: ClassificationData, device: torch.device, classes: int) -> dict:
    """Top-1, top-5, loss and per-class [hits, images] over a whole (unsharded) split; "images"
    were read, "skipped" (of the split's listed) could not be."""
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    per_class = np.zeros((classes, 2), dtype=np.int64)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for step in range(data.steps_per_epoch):
        stop_point(f"after {data.inputs.tried_count} of the {data.inputs.listed} images")  # `beit evaluate` alone
        pixels, labels = data.batch(step)
        if not len(labels):
            continue
        with autocast:
            logits = model(pixels.to(device)).float()
        labels = labels.to(device)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, classes), dim=1).indices
        hit1 = top[:, 0] == labels
        correct1 += int(hit1.sum())
        correct5 += int((top == labels[:, None]).any(1).sum())
        total += len(labels)
        np.add.at(per_class, (labels.cpu().numpy(), 0), hit1.cpu().numpy().astype(np.int64))
        np.add.at(per_class, (labels.cpu().numpy(), 1), 1)
    model.train()
    return {
        "top1": correct1 / max(total, 1),
        "top5": correct5 / max(total, 1),
        "loss": loss_sum / max(total, 1),
        "images": total,
        "skipped": len(data.inputs.skipped),
        "per_class": per_class.tolist(),
    }


def evaluate_classifier_checkpoint(
    checkpoint: Path,
    data: Path,
    batch_size: int = 64,
    device: str = "auto",
    threads: int = 0,
    max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
    skipped_file: Path | None = None,
) -> dict:
    """`evaluate` of a fine-tuned checkpoint on an ImageFolder tree (or folder) whose classes
    the checkpoint knows; adds "class_names", "inputs" (listed, read, skipped; the skipped files
    in `skipped_file` when given, else in the result) and "basis" (what the figures are over)."""
    state, meta = load_checkpoint(checkpoint)
    if meta.get("kind") != "finetune":
        raise ValueError(f"{checkpoint} is a {meta.get('kind')} checkpoint: evaluate a fine-tuned one.")
    model = BeitClassifier(ModelConfig(**meta["model"]))
    model.load_state_dict(state["model"])
    source = read_source(data)
    names = meta["class_names"]
    relabel(source, names)
    torch_device = choose_device(device)
    log = SkippedLog(skipped_file) if skipped_file is not None else None
    inputs = classify_inputs(source, "", max_skipped_fraction, log, "--max-skipped-fraction F")
    loader = ClassificationData(
        source, model.cfg.image_size, batch_size, False, threads=threads, device_id=dali_device_id(torch_device),
        inputs=inputs,
    )  # fmt: skip
    result = evaluate_classifier(model.to(torch_device), loader, torch_device, len(names))
    if not result["images"]:
        raise ValueError(f"none of the {inputs.listed} images of {data} could be read: check the path and the files.")
    return {**result, "class_names": names, "inputs": inputs.summary(), "basis": inputs.basis()}
