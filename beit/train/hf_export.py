"""`beit export --format hf`: a checkpoint as a Hugging Face model folder (`config.json` plus
`model.safetensors`) that transformers' `from_pretrained` loads as

- `BeitForMaskedImageModeling` (a `beit pretrain` checkpoint),
- `BeitForImageClassification` (`beit finetune`; `id2label` from its class names),
- `BeitForSemanticSegmentation` (`beit segment train` with the UperNet head; the auxiliary FCN
  head included).

transformers' segmentation forward takes feature map k from hidden_states[out_indices[k] - 1],
and hidden_states[0] is the embedding output, so the released blocks (3, 5, 7, 11 of 12, counted
from 0) are out_indices 5, 7, 9, 13; its config allows indices up to the number of layers only. So
when the last block is one of the four, the export appends one block that is exactly the identity
(its layer scales are 0: x + 0 * attention + 0 * MLP = x) and declares depth + 1 layers: the logits
are the same, at the cost of one inert block's weights. The config also carries this project's
own model settings ("beit_model", "beit_segmenter"), so that reading the folder back builds the
same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from beit.shared.checkpoint import load_checkpoint
from beit.shared.config import to_dict
from beit.shared.hf_format import HFFormatError, hub_out_indices, to_hub_names
from beit.train.model import ModelConfig

ARCHITECTURES = {
    "pretrain": "BeitForMaskedImageModeling",
    "finetune": "BeitForImageClassification",
    "segment": "BeitForSemanticSegmentation",
}


def hub_config(cfg: ModelConfig, architecture: str, **extra) -> dict:
    """transformers' BeitConfig (as a dict) of this project's resolved model config."""
    mim = architecture == "BeitForMaskedImageModeling"
    return {
        "model_type": "beit",
        "architectures": [architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.heads,
        "intermediate_size": int(cfg.width * cfg.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.layer_norm_eps,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": 3,
        "use_mask_token": mim,
        "use_absolute_position_embeddings": False,
        "use_relative_position_bias": not mim,
        "use_shared_relative_position_bias": mim,
        "layer_scale_init_value": cfg.layer_scale,
        "drop_path_rate": cfg.drop_path,
        "use_mean_pooling": True,
        "beit_model": to_dict(cfg),
        **extra,
    }


def _labels(names: list[str]) -> dict:
    return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}


def _identity_block(state: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Block `index`: block 0's shapes, every weight 0, so with layer scales of 0 it is the identity."""
    prefix = "blocks.0."
    return {
        f"blocks.{index}.{key[len(prefix) :]}": torch.zeros_like(value)
        for key, value in state.items()
        if key.startswith(prefix) and not key.endswith("relative_position_index")
    }


def _segmenter(cfg: ModelConfig, meta: dict, weights: dict, source: Path) -> tuple[dict, dict]:
    if meta["head"] != "upernet":
        raise HFFormatError(
            f"{source} has the {meta['head']} head: transformers' BeitForSemanticSegmentation has UperNet only, "
            "so the export would compute something else; export a segmenter trained with --head upernet."
        )
    channels = meta["channels"] or cfg.width
    if channels != cfg.width:
        raise HFFormatError(
            f"{source}'s UperNet has {channels} channels, but transformers' has as many as the model's width "
            f"({cfg.width}): train with --set channels=0 (the released setting) to export it."
        )
    indices = hub_out_indices(meta["out_indices"])
    depth = cfg.depth
    if max(indices) > depth:  # the last block is one of them: one more, inert block makes room
        weights = {**weights, **_identity_block(weights, depth)}
        depth += 1
    extra = {
        "num_hidden_layers": depth,
        "out_indices": indices,
        "pool_scales": [1, 2, 3, 6],
        "use_auxiliary_head": True,
        "auxiliary_channels": meta["aux_channels"],
        "auxiliary_num_convs": 1,
        "auxiliary_concat_input": False,
        "auxiliary_loss_weight": 0.4,
        "semantic_loss_ignore_index": 255,
        "beit_segmenter": {k: meta[k] for k in ("head", "channels", "aux_channels", "out_indices")},
        **_labels(meta["class_names"]),
    }
    return extra, weights


def export_hf(checkpoint: Path, out: Path) -> dict:
    """Write `checkpoint` (this project's) as a Hugging Face model folder `out`; returns its config."""
    from safetensors.torch import save_file

    state, meta = load_checkpoint(checkpoint)
    kind = meta.get("kind")
    if kind not in ARCHITECTURES:
        raise HFFormatError(
            f"{checkpoint} is a {kind} checkpoint: export a pre-training, fine-tuning or segmentation one."
        )
    cfg = ModelConfig(**meta["model"]).resolved()
    weights = state["model"]
    extra: dict = {}
    if kind == "finetune":
        extra = _labels(meta["class_names"])
    elif kind == "segment":
        extra, weights = _segmenter(cfg, meta, weights, checkpoint)
    config = hub_config(cfg, ARCHITECTURES[kind], **extra)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_hub_names(weights), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config
