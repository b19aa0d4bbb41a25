"""`beit export --format onnx`: a classifier and a segmenter run by onnxruntime give the project's
logits on the same inputs, at several batch sizes (the batch is dynamic)."""

import numpy as np
import pytest
import torch
from helpers import beit_here, randomised

from beit.shared.checkpoint import save_checkpoint
from beit.shared.config import to_dict
from beit.train.model import BeitClassifier, BeitForMIM, ModelConfig
from beit.train.segment.model import BeitSegmenter

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CFG = dict(preset="custom", width=64, depth=4, heads=2, image_size=64, patch_size=16, num_classes=3)


def _exported(tmp_path, model, kind, **meta):
    checkpoint = tmp_path / f"{kind}.pt"
    save_checkpoint(checkpoint, {"model": model.state_dict()}, {"kind": kind, "model": to_dict(model.cfg), **meta})
    result = beit_here("export", checkpoint, "--format", "onnx", "-o", tmp_path / f"{kind}.onnx")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, ort.InferenceSession(str(tmp_path / f"{kind}.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kind", ["finetune", "segment"])
def test_onnxruntime_gives_the_models_logits_at_any_batch(tmp_path, kind):
    if kind == "finetune":
        model, meta = randomised(BeitClassifier(ModelConfig(**CFG))), {"class_names": ["a", "b", "c"]}
    else:
        model = randomised(BeitSegmenter(ModelConfig(**CFG), aux_channels=16))
        meta = dict(head="upernet", channels=0, aux_channels=16, out_indices=list(model.out_indices))
    stdout, session = _exported(tmp_path, model, kind, **meta)
    shape = "[batch, 3]" if kind == "finetune" else "[batch, 3, 64, 64]"
    assert f"pixel_values [batch, 3, 64, 64] -> logits {shape} (opset 18)" in stdout
    for batch in (1, 3):
        pixels = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ours = model(pixels).numpy()
        (theirs,) = session.run(None, {"pixel_values": pixels.numpy()})
        assert theirs.shape == ours.shape
        # max |difference| measured 2026-12-02 (AMD EPYC, onnxruntime 1.32, torch 2.13): 3e-8 to 4.5e-8
        # (classifier), 2.2e-8 to 2.6e-8 (segmenter), on logits up to 0.15; tolerance 1e-5
        assert np.abs(theirs - ours).max() <= 1e-5, np.abs(theirs - ours).max()


def test_a_pretraining_checkpoint_is_refused(tmp_path):
    model = BeitForMIM(ModelConfig(**{**CFG, "vocab_size": 32}))
    checkpoint = tmp_path / "pt.pt"
    save_checkpoint(checkpoint, {"model": model.state_dict()}, {"kind": "pretrain", "model": to_dict(model.cfg)})
    result = beit_here("export", checkpoint, "--format", "onnx", "-o", tmp_path / "pt.onnx")
    assert (
        result.returncode == 1 and "is a pre-training checkpoint: export a classifier or a segmenter" in result.stderr
    )
    assert not (tmp_path / "pt.onnx").exists()
