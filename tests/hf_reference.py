"""Hugging Face transformers' BEiT as an independent implementation to compare against.
Maps this project's (released) parameter names onto transformers 5's names."""

from __future__ import annotations

import re

import torch

from beit.train.model import BeitClassifier, BeitForMIM, ModelConfig

_BLOCK = {
    "gamma_1": "lambda_1",
    "gamma_2": "lambda_2",
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
    "attn.proj.weight": "attention.o_proj.weight",
    "attn.proj.bias": "attention.o_proj.bias",
    "attn.q_bias": "attention.q_proj.bias",
    "attn.v_bias": "attention.v_proj.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "attn.relative_position_bias_table": "relative_position_bias.relative_position_bias_table",
}
_TOP = {
    "cls_token": "beit.embeddings.cls_token",
    "mask_token": "beit.embeddings.mask_token",
    "patch_embed.proj.weight": "beit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "beit.embeddings.patch_embeddings.projection.bias",
    "rel_pos_bias.relative_position_bias_table": "beit.shared_position_bias.relative_position_bias_table",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
    "fc_norm.weight": "beit.pooler.layernorm.weight",
    "fc_norm.bias": "beit.pooler.layernorm.bias",
    "head.weight": "classifier.weight",
    "head.bias": "classifier.bias",
}


def to_huggingface(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if not match:
            out[_TOP[key]] = value
            continue
        i, rest = match.groups()
        prefix = f"beit.layers.{i}."
        if rest == "attn.qkv.weight":
            q, k, v = value.chunk(3)
            out[prefix + "attention.q_proj.weight"] = q
            out[prefix + "attention.k_proj.weight"] = k
            out[prefix + "attention.v_proj.weight"] = v
        else:
            out[prefix + _BLOCK[rest]] = value
    return out


def _config(cfg: ModelConfig, **extra):
    """transformers' BeitConfig of this project's model config (no dropout), plus `extra`."""
    from transformers import BeitConfig

    labels = extra.get("num_labels", cfg.num_classes)
    return BeitConfig(
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        intermediate_size=int(cfg.width * cfg.mlp_ratio),
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act="gelu",
        use_absolute_position_embeddings=False,
        layer_scale_init_value=cfg.layer_scale,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        id2label={i: str(i) for i in range(labels)},
        **extra,
    )


def huggingface_twin(model: BeitForMIM | BeitClassifier, drop_path: float = 0.0):
    """The transformers model of the same configuration, loaded with `model`'s weights
    (in eval mode; stochastic depth `drop_path` applies when it is put in train mode)."""
    from transformers import BeitForImageClassification, BeitForMaskedImageModeling

    cfg: ModelConfig = model.cfg
    mim = isinstance(model, BeitForMIM)
    hf_cfg = _config(
        cfg,
        vocab_size=cfg.vocab_size,
        use_mask_token=mim,
        use_relative_position_bias=not mim,
        use_shared_relative_position_bias=mim,
        drop_path_rate=drop_path,
        use_mean_pooling=True,
        num_labels=cfg.num_classes if not mim else 2,
    )
    hf = BeitForMaskedImageModeling(hf_cfg) if mim else BeitForImageClassification(hf_cfg)
    missing, unexpected = hf.load_state_dict(to_huggingface(model.state_dict()), strict=False)
    assert not unexpected, unexpected
    assert all("relative_position_index" in k for k in missing), missing
    return hf.eval()


def _segmentation_key(key: str) -> str:
    """One of this project's (mmseg's) segmentation head keys in transformers 5's names."""
    key = re.sub(r"^fpn1\.0\.", "fpn.fpn1.conv_transpose1.", key)
    key = re.sub(r"^fpn1\.1\.", "fpn.fpn1.normalization.", key)
    key = re.sub(r"^fpn1\.3\.", "fpn.fpn1.conv_transpose2.", key)
    key = re.sub(r"^fpn2\.0\.", "fpn.fpn2.", key)
    key = re.sub(r"psp_modules\.(\d+)\.1\.", r"psp_modules.blocks.\1.conv.", key)
    key = key.replace("decode_head.bottleneck.", "decode_head.psp_bottleneck.")
    key = key.replace(".conv.weight", ".convolution.weight").replace(".bn.", ".normalization.")
    return key.replace("conv_seg.", "classifier.")


def huggingface_segmenter_twin(model):
    """transformers' BeitForSemanticSegmentation with `model`'s (a BeitSegmenter's) weights, in
    eval mode, its out_indices set to unilm's blocks counted from 1. What it does with them is
    another matter: `huggingface_segmenter_logits` and the test say."""
    from transformers import BeitForSemanticSegmentation

    cfg: ModelConfig = model.cfg
    hf_cfg = _config(
        cfg,
        use_relative_position_bias=True,
        drop_path_rate=0.0,
        out_indices=[i + 1 for i in model.out_indices],
        pool_scales=[1, 2, 3, 6],
        use_auxiliary_head=True,
        auxiliary_channels=model.auxiliary_head.convs[0].conv.out_channels,
        auxiliary_num_convs=1,
        auxiliary_concat_input=False,
        num_labels=cfg.num_classes,
    )
    hf = BeitForSemanticSegmentation(hf_cfg)
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith(("blocks.", "cls_token", "patch_embed."))}
    heads = {_segmentation_key(k): v for k, v in model.state_dict().items() if k.startswith(model.head_prefixes)}
    missing, unexpected = hf.load_state_dict({**to_huggingface(backbone), **heads}, strict=False)
    assert not unexpected, unexpected
    assert all("relative_position_index" in k for k in missing), missing
    return hf.eval()


def huggingface_segmenter_logits(hf, pixels: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
    """transformers' neck and UperNet head on the outputs of `blocks` (0-based, unilm's way),
    selected explicitly from its hidden states (hidden_states[0] is the embedding output, so
    block i's output is hidden_states[i + 1])."""
    hidden = hf.beit(pixel_values=pixels, output_hidden_states=True).hidden_states
    b, _, h, w = pixels.shape
    side = (h // hf.config.patch_size, w // hf.config.patch_size)
    maps = [hidden[i + 1][:, 1:].transpose(1, 2).reshape(b, -1, *side) for i in blocks]
    return hf.decode_head(hf.fpn(maps))
