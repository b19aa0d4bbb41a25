"""The BEiT Vision Transformer, as released (Bao et al., 2021; unilm/beit).

Two models share one backbone and the released parameter names, so that unilm and timm
checkpoints load with no renaming (adapting anything else is `beit.shared.checkpoint`'s job):

- `BeitForMIM`: pre-training. Patch embed, cls token, the mask token swapped in after
  embedding, no absolute position embedding, one relative position bias table shared by all
  blocks (`rel_pos_bias.relative_position_bias_table`), final norm and `lm_head` applied to
  masked positions only.
- `BeitClassifier`: fine-tuning. The same blocks, each with its own relative position table
  (`blocks.i.attn.relative_position_bias_table`), mean of the patch tokens -> `fc_norm` -> `head`.

Shapes: pixels [B, 3, H, W]; patch grid (gh, gw) = (H / p, W / p); tokens N = gh * gw;
mask [B, N] bool, True = masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# name: (width, depth, heads, layer_scale). Layer scale 0.1 except large (1e-5), as released.
PRESETS: dict[str, tuple[int, int, int, float]] = {
    "tiny": (192, 12, 3, 0.1),
    "small": (384, 12, 6, 0.1),
    "base": (768, 12, 12, 0.1),
    "large": (1024, 24, 16, 1e-5),
}


@dataclass
class ModelConfig:
    """Size and regularisation of a BEiT model. `preset` fills width/depth/heads/layer_scale
    where they are left at 0; any of them may be set to build a custom size."""

    preset: str = "base"
    image_size: int = 224
    patch_size: int = 16
    width: int = 0
    depth: int = 0
    heads: int = 0
    mlp_ratio: float = 4.0
    layer_scale: float = 0.0
    drop_path: float = 0.1
    layer_norm_eps: float = 1e-6
    vocab_size: int = 8192
    num_classes: int = 1000
    init_std: float = 0.02

    def resolved(self) -> ModelConfig:
        """A copy with the preset's values filled in and the sizes checked."""
        if self.preset not in PRESETS and not (self.width and self.depth and self.heads):
            raise ValueError(
                f"model.preset {self.preset!r} is unknown: use one of {', '.join(PRESETS)}, "
                "or set model.width, model.depth and model.heads for a custom size."
            )
        width, depth, heads, layer_scale = PRESETS.get(self.preset, (0, 0, 0, 0.1))
        out = ModelConfig(**{**self.__dict__})
        out.width = self.width or width
        out.depth = self.depth or depth
        out.heads = self.heads or heads
        out.layer_scale = self.layer_scale or layer_scale
        if out.width % out.heads:
            raise ValueError(f"model.width {out.width} is not divisible by model.heads {out.heads}.")
        if out.image_size % out.patch_size:
            raise ValueError(
                f"model.image_size {out.image_size} is not a multiple of model.patch_size "
                f"{out.patch_size}: choose sizes that divide."
            )
        return out

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return (side, side)


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """[N+1, N+1] indices into a table of (2gh-1)(2gw-1)+3 rows; the last three rows are
    cls->token, token->cls and cls->cls, as released."""
    gh, gw = grid
    coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += gh - 1
    rel[:, :, 1] += gw - 1
    rel[:, :, 0] *= 2 * gw - 1
    n_rel = (2 * gh - 1) * (2 * gw - 1) + 3
    index = torch.zeros((gh * gw + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, :] = n_rel - 3
    index[:, 0] = n_rel - 2
    index[0, 0] = n_rel - 1
    return index


class RelativePositionBias(nn.Module):
    """A learned [heads, N+1, N+1] additive attention bias indexed by relative position."""

    def __init__(self, grid: tuple[int, int], heads: int):
        super().__init__()
        self.grid = grid
        rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, heads))
        self.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)

    def forward(self) -> torch.Tensor:
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1).contiguous()


class Attention(nn.Module):
    """Multi-head self-attention with q and v bias (k has none), as released.
    Its own relative position table exists only when `grid` is given (fine-tuning)."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int] | None = None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        if grid is not None:
            rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
            self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, heads))
            self.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)
        else:
            self.relative_position_bias_table = None

    def own_bias(self) -> torch.Tensor:
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, shared_bias: torch.Tensor | None = None) -> torch.Tensor:
        batch, n, dim = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(batch, n, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn_bias = self.own_bias() if self.relative_position_bias_table is not None else shared_bias
        if attn_bias is not None:
            attn_bias = attn_bias.unsqueeze(0).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        return self.proj(out.transpose(1, 2).reshape(batch, n, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch for whole samples, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, drop_path_rate: float, grid: tuple[int, int] | None):
        super().__init__()
        dim = cfg.width
        self.drop_path_rate = drop_path_rate
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, cfg.heads, grid)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.full((dim,), cfg.layer_scale))
        self.gamma_2 = nn.Parameter(torch.full((dim,), cfg.layer_scale))

    def forward(self, x: torch.Tensor, shared_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + drop_path(self.gamma_1 * self.attn(self.norm1(x), shared_bias), self.drop_path_rate, self.training)
        return x + drop_path(self.gamma_2 * self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.grid = cfg.grid
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, N, D]"""
        return self.proj(pixels).flatten(2).transpose(1, 2)


class BeitBackbone(nn.Module):
    """Patch embed, cls token and blocks. `shared_bias=True` gives the pre-training layout
    (one table for all blocks); False gives every block its own table (fine-tuning)."""

    def __init__(self, cfg: ModelConfig, shared_bias: bool):
        super().__init__()
        cfg = cfg.resolved()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.rel_pos_bias = RelativePositionBias(cfg.grid, cfg.heads) if shared_bias else None
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        block_grid = None if shared_bias else cfg.grid
        self.blocks = nn.ModuleList(Block(cfg, rate, block_grid) for rate in rates)

    def init_weights(self, conv: bool) -> None:
        """The released init: trunc-normal(std) for linear weights (and the patch-embed conv when
        `conv`: the pre-training model does this, the fine-tuning one keeps PyTorch's default) and
        the learned tokens, zero biases, unit norms, then attn.proj and mlp.fc2 divided by
        sqrt(2 * layer_id)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear) or (conv and isinstance(module, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.cls_token, std=std)
        with torch.no_grad():
            for layer_id, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def encode(
        self,
        pixels: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        return_layers: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """[B, 3, H, W] (+ mask [B, N]) -> [B, 1 + N, D] after the last block
        (or the output of every block, when `return_layers`)."""
        x = self.patch_embed(pixels)
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + mask_token.to(x.dtype) * w
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        shared = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        layers = []
        for block in self.blocks:
            x = block(x, shared)
            layers.append(x)
        return layers if return_layers else x

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides biases and norms (1-D parameters).
        The released list: the mask token and relative position tables are decayed."""
        return {"cls_token", "pos_embed"}


class BeitForMIM(BeitBackbone):
    """Masked image modeling: predict the visual token of every masked patch."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, shared_bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.cfg.width))
        self.norm = nn.LayerNorm(self.cfg.width, eps=self.cfg.layer_norm_eps)
        self.lm_head = nn.Linear(self.cfg.width, self.cfg.vocab_size)
        self.init_weights(conv=True)
        nn.init.trunc_normal_(self.mask_token, std=self.cfg.init_std)

    def forward(
        self,
        pixels: torch.Tensor,
        mask: torch.Tensor,
        index: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """pixels [B, 3, H, W], mask [B, N] bool -> logits [M, vocab] for the M masked patches,
        in row-major order of (sample, patch). `index` (the M flat positions of `mask`, made
        where the mask was made) spares the GPU a host synchronisation on mask.nonzero().
        With `positions` [B, K] (`masking.masked_positions`: each image's masked patches, padded
        to K), logits [B, K, vocab] instead: the same shapes every step, for torch.compile."""
        x = self.norm(self.encode(pixels, mask, self.mask_token))[:, 1:]
        if positions is not None:
            return self.lm_head(x.gather(1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1])))
        if index is None:
            index = mask.flatten().nonzero().squeeze(1)
        return self.lm_head(x.flatten(0, 1).index_select(0, index))


def mim_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy over masked positions only. logits [M, vocab] from `BeitForMIM`,
    targets [B, N] token ids, mask [B, N] bool (or `index`, its M flat positions); or logits
    [B, K, vocab] with the `positions` and `valid` [B, K] they were taken at (the padding is
    ignored: the same mean as over the M masked patches)."""
    if positions is not None:
        picked = targets.gather(1, positions).long().masked_fill(~valid, -100)
        return F.cross_entropy(logits.flatten(0, 1).float(), picked.flatten(), ignore_index=-100)
    if logits.shape[0] == 0:
        raise ValueError("no masked patches in this batch: a MIM loss needs at least one (check the mask count).")
    if index is None:
        index = mask.flatten().nonzero().squeeze(1)
    return F.cross_entropy(logits.float(), targets.flatten().index_select(0, index).long())


class BeitClassifier(BeitBackbone):
    """Classification: mean of patch tokens -> fc_norm -> head (head init scaled by 0.001)."""

    def __init__(self, cfg: ModelConfig, head_init_scale: float = 0.001):
        super().__init__(cfg, shared_bias=False)
        self.fc_norm = nn.LayerNorm(self.cfg.width, eps=self.cfg.layer_norm_eps)
        self.head = nn.Linear(self.cfg.width, self.cfg.num_classes)
        self.init_weights(conv=False)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> pooled features [B, D]."""
        return self.fc_norm(self.encode(pixels)[:, 1:].mean(1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> logits [B, classes]"""
        return self.head(self.features(pixels))

    def layer_id(self, name: str) -> int:
        """The released layer ids for layer-wise lr decay: patch embed and cls token 0,
        block i is i + 1, everything else (head, fc_norm, a shared bias table) depth + 1."""
        if name.startswith(("cls_token", "mask_token", "pos_embed", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.cfg.depth + 1


def config_from_state_dict(state: dict[str, torch.Tensor]) -> ModelConfig:
    """The `ModelConfig` a BEiT state dict (this project's, unilm's or timm's key names) was made
    with, read from its shapes: width (cls token), depth (blocks), patch size (patch embed), heads
    and patch grid (a relative position table: (2g - 1)^2 + 3 rows, one column per head), MLP
    ratio, vocabulary (lm_head) and classes (head). Raises ValueError naming what is missing."""
    from beit.shared.checkpoint import SHARED_TABLE, table_grid

    needed = ("cls_token", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [key for key in needed if key not in state]
    table = state.get(SHARED_TABLE, state.get("blocks.0.attn.relative_position_bias_table"))
    if missing or table is None:
        what = ", ".join(missing) or "a relative position bias table"
        raise ValueError(f"the weights have no {what}: they are not a BEiT with relative positions.")
    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = table_grid(table.shape[0])
    depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))
    return ModelConfig(
        preset="custom",
        image_size=grid[0] * patch,
        patch_size=patch,
        width=width,
        depth=depth,
        heads=table.shape[1],
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / width,
        vocab_size=state["lm_head.weight"].shape[0] if "lm_head.weight" in state else 8192,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 1000,
    )


# The settings a model's weights fix (its architecture), as opposed to those a task or a run chooses.
ARCHITECTURE = ("patch_size", "width", "depth", "heads", "mlp_ratio", "layer_norm_eps")


def architecture_of(init: str | Path) -> tuple[ModelConfig, str]:
    """The resolved `ModelConfig` of the model in `init` (this project's checkpoint, foreign
    weights or a Hugging Face folder) and where it was read from ("its recorded config" or "its
    tensors' shapes")."""
    from beit.shared import hf_format
    from beit.shared.checkpoint import read_any

    path = Path(init)
    if hf_format.is_hf_folder(path):
        return ModelConfig(**hf_format.model_fields(hf_format.read_config(path))).resolved(), "its config.json"
    cfg, where = config_of(*read_any(path))
    return cfg.resolved(), where


def config_of(state: dict, meta: dict | None) -> tuple[ModelConfig, str]:
    """The `ModelConfig` of what `read_any` read: the one a project checkpoint records ("its
    recorded config"), else the one its weights' shapes imply ("its tensors' shapes")."""
    if meta is not None and isinstance(meta.get("model"), dict):
        return ModelConfig(**meta["model"]), "its recorded config"
    return config_from_state_dict(state if meta is None else state["model"]), "its tensors' shapes"


def take_architecture(
    cfg: ModelConfig, init: str | Path, explicit: set[str], keys: tuple[str, ...] = ARCHITECTURE
) -> tuple[ModelConfig, list[str]]:
    """`cfg` with the `keys` of `init`'s model, except those the user set (`explicit`: dotted
    config keys such as "model.width"; "model.preset" counts for width, depth and heads); notes
    naming each explicit setting that differs from the checkpoint's."""
    theirs, where = architecture_of(init)
    asked = cfg.resolved() if cfg.preset in PRESETS or (cfg.width and cfg.depth and cfg.heads) else cfg
    out = ModelConfig(**{**cfg.__dict__})
    by_preset = {"width", "depth", "heads"} if "model.preset" in explicit else set()
    taken, notes = False, []
    for key in keys:
        value = getattr(theirs, key)
        if f"model.{key}" in explicit or key in by_preset:
            if getattr(asked, key) != value:
                notes.append(f"model.{key} {getattr(asked, key)} as asked, not the checkpoint's {value}")
        else:
            setattr(out, key, value)
            taken = taken or key in ("width", "depth", "heads")
    if taken:  # the checkpoint's size, whatever preset the config names
        out.preset, out.layer_scale = theirs.preset if theirs.preset in PRESETS else "custom", theirs.layer_scale
    if notes:
        notes = [f"{init} holds another model than the one asked for ({where}): " + "; ".join(notes)]
    return out, notes
