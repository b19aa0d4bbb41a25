"""Hugging Face transformers' BEiT format, both ways, without importing transformers.

A Hugging Face model folder holds `config.json` (a `BeitConfig`: model_type "beit", the class in
`architectures`) and the weights in `model.safetensors` (or `pytorch_model.bin`, read through the
allow-list loader; a sharded checkpoint's `*.index.json` is followed). Weight names come in two
schemes: the hub's (transformers 4, what the released microsoft/beit-* checkpoints use, e.g.
`beit.encoder.layer.0.attention.attention.query.weight`) and transformers 5's
(`beit.layers.0.attention.q_proj.weight`), which transformers 5 also reads the hub's scheme into.
This module writes the hub's scheme (loadable by transformers 4 and 5) and reads either.

This project's names are the released unilm/timm ones (`beit.train.model`); the differences:
one fused `qkv` weight against three (`query`, `key` without bias, `value`), the layer scales
`gamma_1/2` against `lambda_1/2`, `fc_norm` against the pooler's layernorm, `head` against
`classifier`, and for segmentation mmseg's `conv_seg` against `classifier` (the neck and the
UperNet modules keep mmseg's names in the hub's scheme).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

# after "blocks.{i}." -> after "beit.encoder.layer.{i}."
_BLOCK = {
    "gamma_1": "lambda_1",
    "gamma_2": "lambda_2",
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
    "attn.q_bias": "attention.attention.query.bias",
    "attn.v_bias": "attention.attention.value.bias",
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "attn.relative_position_bias_table": "attention.attention.relative_position_bias.relative_position_bias_table",
    "mlp.fc1.weight": "intermediate.dense.weight",
    "mlp.fc1.bias": "intermediate.dense.bias",
    "mlp.fc2.weight": "output.dense.weight",
    "mlp.fc2.bias": "output.dense.bias",
}
_QKV = ("attention.attention.query.weight", "attention.attention.key.weight", "attention.attention.value.weight")
_TOP = {
    "cls_token": "beit.embeddings.cls_token",
    "mask_token": "beit.embeddings.mask_token",
    "patch_embed.proj.weight": "beit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "beit.embeddings.patch_embeddings.projection.bias",
    "rel_pos_bias.relative_position_bias_table": "beit.encoder.relative_position_bias.relative_position_bias_table",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
    "fc_norm.weight": "beit.pooler.layernorm.weight",
    "fc_norm.bias": "beit.pooler.layernorm.bias",
    "head.weight": "classifier.weight",
    "head.bias": "classifier.bias",
}
_HEADS = ("fpn1.", "fpn2.", "decode_head.", "auxiliary_head.")  # the segmenter's neck and heads
# transformers 5's names -> the hub's, applied in order (the inverse of transformers 5's own renames)
_FROM_V5 = [
    (r"^beit\.layers\.(\d+)\.", r"beit.encoder.layer.\1."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
    (r"(layer\.\d+)\.relative_position_bias\.", r"\1.attention.attention.relative_position_bias."),
    (r"^beit\.shared_position_bias\.", "beit.encoder.relative_position_bias."),
    (r"^fpn\.fpn1\.conv_transpose1\.", "fpn1.0."),
    (r"^fpn\.fpn1\.normalization\.", "fpn1.1."),
    (r"^fpn\.fpn1\.conv_transpose2\.", "fpn1.3."),
    (r"^fpn\.fpn2\.", "fpn2.0."),
    (r"psp_modules\.blocks\.(\d+)\.conv\.", r"psp_modules.\1.1."),
    (r"decode_head\.psp_bottleneck\.", "decode_head.bottleneck."),
    (r"\.convolution\.weight$", ".conv.weight"),
    (r"\.normalization\.", ".bn."),
]
KINDS = {
    "BeitForMaskedImageModeling": "pretrain",
    "BeitForImageClassification": "finetune",
    "BeitForSemanticSegmentation": "segment",
    "BeitModel": "backbone",
}


class HFFormatError(ValueError):
    """A Hugging Face folder this project cannot read, or a model the format cannot express."""


def to_hub_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This project's state dict (any of its models) in the hub's names; index buffers dropped."""
    out = {}
    for key, value in state.items():
        if key.endswith("relative_position_index"):
            continue
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if match:
            prefix, rest = f"beit.encoder.layer.{match[1]}.", match[2]
            if rest == "attn.qkv.weight":
                for name, part in zip(_QKV, value.chunk(3), strict=True):
                    out[prefix + name] = part
            else:
                out[prefix + _BLOCK[rest]] = value
        elif key.startswith(_HEADS):
            out[key.replace("conv_seg.", "classifier.")] = value
        else:
            out[_TOP[key]] = value
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hub_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face BEiT state dict (the hub's names or transformers 5's) in this project's names.
    A model without layer scale (no lambda_1/2) gets gammas of 1, which is the same model."""
    top = {hf: ours for ours, hf in _TOP.items()}
    block = {hf: ours for ours, hf in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for pattern, replacement in _FROM_V5:
            key = re.sub(pattern, replacement, key)
        if key.endswith("relative_position_index"):
            continue
        match = re.fullmatch(r"beit\.encoder\.layer\.(\d+)\.(.+)", key)
        if match:
            i, rest = match[1], match[2]
            if rest in _QKV:
                qkv.setdefault(i, {})[rest] = value
            elif rest in block:
                out[f"blocks.{i}.{block[rest]}"] = value
            else:
                raise HFFormatError(f"weight {key} is not part of a BEiT this project builds.")
        elif key in top:
            out[top[key]] = value
        elif key.startswith(_HEADS):
            out[key.replace("classifier.", "conv_seg.")] = value
        elif key.startswith("beit.") or key in ("layernorm.weight", "layernorm.bias"):
            raise HFFormatError(f"weight {key} is not part of a BEiT this project builds.")
    for i, parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts[name] for name in _QKV])
        width = parts[_QKV[0]].shape[1]
        for gamma in ("gamma_1", "gamma_2"):
            out.setdefault(f"blocks.{i}.{gamma}", torch.ones(width))
    return out


def hub_out_indices(blocks: list[int]) -> list[int]:
    """transformers' segmentation out_indices for feature maps after `blocks` (counted from 0):
    it takes map k from hidden_states[out_indices[k] - 1], and block b's output is hidden_states[b + 1]."""
    return [b + 2 for b in blocks]


def segmenter_fields(config: dict[str, Any]) -> dict[str, Any]:
    """A BeitForSemanticSegmentation config's segmenter settings ({head, channels, aux_channels,
    out_indices}, blocks counted from 0): those this project recorded, else what transformers computes."""
    if isinstance(config.get("beit_segmenter"), dict):
        return dict(config["beit_segmenter"])
    return {
        "head": "upernet",
        "channels": 0,  # transformers' UperNet has as many channels as the model's width
        "aux_channels": config.get("auxiliary_channels", 256),
        "out_indices": [i - 2 for i in config["out_indices"]],  # the inverse of `hub_out_indices`
    }


def is_hf_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def read_config(folder: str | Path) -> dict[str, Any]:
    """The folder's config.json, checked to be a BEiT this project builds."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise HFFormatError(f"{path} cannot be read as JSON ({error}): pass a Hugging Face model folder.") from None
    if config.get("model_type") != "beit":
        raise HFFormatError(f"{folder} holds a {config.get('model_type')!r} model, not a BEiT (model_type 'beit').")
    if config.get("use_absolute_position_embeddings"):
        raise HFFormatError(
            f"{folder} is a BEiT with absolute position embeddings, which this project's model does not "
            "have (it uses relative position biases, as the released BEiT): convert it elsewhere."
        )
    if not (config.get("use_relative_position_bias") or config.get("use_shared_relative_position_bias")):
        raise HFFormatError(f"{folder} is a BEiT without relative position biases: this project's model needs them.")
    return config


def kind_of(config: dict[str, Any]) -> str:
    """pretrain, finetune, segment or backbone, from the config's `architectures`."""
    architecture = (config.get("architectures") or ["BeitModel"])[0]
    if architecture not in KINDS:
        raise HFFormatError(f"architecture {architecture} is not one of {', '.join(KINDS)}.")
    return KINDS[architecture]


def model_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The `ModelConfig` fields of a BeitConfig (the ones exported by this project carry them
    under "beit_model", exactly)."""
    if isinstance(config.get("beit_model"), dict):
        return dict(config["beit_model"])
    width = config["hidden_size"]
    labels = config.get("id2label") or {}
    return {
        "preset": "custom",
        "image_size": config.get("image_size", 224),
        "patch_size": config.get("patch_size", 16),
        "width": width,
        "depth": config["num_hidden_layers"],
        "heads": config["num_attention_heads"],
        "mlp_ratio": config.get("intermediate_size", 4 * width) / width,
        "layer_scale": config.get("layer_scale_init_value") or 1.0,  # no layer scale: gammas of 1
        "drop_path": config.get("drop_path_rate", 0.1),
        "layer_norm_eps": config.get("layer_norm_eps", 1e-12),
        "vocab_size": config.get("vocab_size", 8192),
        "num_classes": len(labels) or 1000,
        "init_std": config.get("initializer_range", 0.02),
    }


def class_names(config: dict[str, Any]) -> list[str] | None:
    labels = config.get("id2label")
    return [labels[str(i)] if str(i) in labels else labels[i] for i in range(len(labels))] if labels else None


def weight_files(folder: str | Path) -> list[Path]:
    """The folder's weight files: model.safetensors, pytorch_model.bin, or the shards an index lists."""
    folder = Path(folder)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
    raise HFFormatError(f"{folder} has a config.json but no model.safetensors or pytorch_model.bin.")
