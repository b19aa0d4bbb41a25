"""Hugging Face transformers' BEiT as an independent implementation to compare against.
Maps this project's (released) parameter names onto transformers 5's names."""

from __future__ import annotations

import re

import torch

from beit.shared.model import BeitClassifier, BeitForMIM, ModelConfig

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


def huggingface_twin(model: BeitForMIM | BeitClassifier, drop_path: float = 0.0):
    """The transformers model of the same configuration, loaded with `model`'s weights
    (in eval mode; stochastic depth `drop_path` applies when it is put in train mode)."""
    from transformers import BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling

    cfg: ModelConfig = model.cfg
    mim = isinstance(model, BeitForMIM)
    hf_cfg = BeitConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        intermediate_size=int(cfg.width * cfg.mlp_ratio),
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act="gelu",
        use_mask_token=mim,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=not mim,
        use_shared_relative_position_bias=mim,
        layer_scale_init_value=cfg.layer_scale,
        layer_norm_eps=cfg.layer_norm_eps,
        drop_path_rate=drop_path,
        use_mean_pooling=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=cfg.num_classes if not mim else 2,
        id2label={i: str(i) for i in range(cfg.num_classes if not mim else 2)},
    )
    hf = BeitForMaskedImageModeling(hf_cfg) if mim else BeitForImageClassification(hf_cfg)
    missing, unexpected = hf.load_state_dict(to_huggingface(model.state_dict()), strict=False)
    assert not unexpected, unexpected
    assert all("relative_position_index" in k for k in missing), missing
    return hf.eval()
