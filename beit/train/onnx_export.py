"""`beit export --format onnx`: a classifier or a segmenter as an ONNX model for ONNX runtimes.

The graph takes `pixel_values` float32 [batch, 3, S, S] (S the model's image size: a classifier's
input size, a segmenter's crop; ImageNet-normalised as training sees them) with a dynamic batch,
and gives `logits`: [batch, classes] for a classifier, [batch, classes, S, S] for a segmenter (its
UperNet logits upsampled to the input, as `BeitSegmenter.forward` gives them; slide a window of S
over larger images). It is written by torch.onnx's exporter (torch.export, then onnxscript) at
`OPSET`, with the weights inside the file. Needs the `onnx` extra: onnx, onnxscript (and
onnxruntime to run or check it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

OPSET = 18


def export_onnx(model: nn.Module, out: Path, opset: int = OPSET) -> dict:
    """Write `model` (a `BeitClassifier` or `BeitSegmenter`, any mode: it is exported in eval mode)
    to `out`; returns {input_size, opset, outputs}."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise ValueError("--format onnx needs onnx and onnxscript: pip install 'beit[onnx]'.") from None
    model = model.eval()
    size = model.cfg.image_size
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_shapes={"pixels": {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.save(str(out))
    return {"input_size": size, "opset": opset, "outputs": tuple(model(example[:1]).shape[1:])}
