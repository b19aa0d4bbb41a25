"""BEiT for semantic segmentation, as released (unilm `beit/semantic_segmentation`: the BEiT
backbone with UperNet, mmseg's heads), with the released parameter names so that unilm's
segmentation checkpoints load with the `backbone.` prefix dropped.

    features   the patch tokens after four blocks (`out_indices`: 3, 5, 7, 11 for depth 12),
               each [B, D, gh, gw] at 1/patch of the input (1/16 as released)
    neck       the four maps at 1/4, 1/8, 1/16 and 1/32 of the input. At patch 16, as released:
               fpn1: two 2x2 transposed convs with BatchNorm and GELU between (1/4), fpn2: one
               (1/8), fpn3: identity (1/16), fpn4: 2x2 max-pool (1/32). At another patch size (a
               power of two) the same rule: one transposed conv per halving of the stride (norm and
               GELU between two), identity at the patch's own stride, max-pooling above it; so a
               patch-4 model's finest map is its own grid, not a 4x upsampling of it
    head       "upernet": pyramid pooling (1, 2, 3, 6) on the last level, lateral 1x1 and FPN 3x3
               conv-BN-ReLU, a 3x3 fusion conv, dropout 0.1, a 1x1 classifier (`decode_head`),
               plus an auxiliary FCN head (one 3x3 conv-BN-ReLU, dropout 0.1) on the third level
               (`auxiliary_head`, loss weight 0.4); "linear": one 1x1 conv on the last block's
               map at 1/patch (no neck)
    output     logits [B, classes, H, W], upsampled bilinearly from 1/4 (UperNet) or 1/patch (linear)

Every block has its own relative position table at the crop's grid (`checkpoint.load_pretrained`
resizes a checkpoint's tables, and copies a pre-training checkpoint's shared one into each block).
BatchNorm in the heads is converted to SyncBatchNorm under DDP by the trainer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from beit.train.model import BeitBackbone, ModelConfig

POOL_SCALES = (1, 2, 3, 6)
AUX_WEIGHT = 0.4
NECK_STRIDES = (4, 8, 16, 32)  # of the input, the four levels UperNet takes


def default_out_indices(depth: int) -> tuple[int, ...]:
    """The blocks whose outputs feed the neck: the released 3, 5, 7, 11 for depth 12 and 7, 11,
    15, 23 for depth 24; four evenly spaced ones ending with the last block otherwise."""
    released = {12: (3, 5, 7, 11), 24: (7, 11, 15, 23)}
    return released.get(depth, tuple(round((i + 1) * depth / 4) - 1 for i in range(4)))


class ConvModule(nn.Sequential):
    """mmcv's ConvModule as the released heads use it: conv (no bias) -> BatchNorm -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)


def neck_level(width: int, patch: int, stride: int) -> nn.Module:
    """The ViT's map at 1/patch of the input -> 1/stride: transposed convs up (the released fpn1
    and fpn2 at patch 16), identity, or max-pooling down (fpn4)."""
    if stride == patch:
        return nn.Identity()
    if stride > patch:
        return nn.MaxPool2d(stride // patch, stride=stride // patch)
    layers = [nn.ConvTranspose2d(width, width, 2, stride=2)]
    for _ in range((patch // stride).bit_length() - 2):
        layers += [nn.BatchNorm2d(width), nn.GELU(), nn.ConvTranspose2d(width, width, 2, stride=2)]
    return nn.Sequential(*layers)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UperHead(nn.Module):
    """mmseg's UPerHead: [4 maps of `cin` channels, fine to coarse] -> logits at the finest map."""

    def __init__(self, cin: int, channels: int, classes: int):
        super().__init__()
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(cin, channels, 1)) for scale in POOL_SCALES
        )
        self.bottleneck = ConvModule(cin + len(POOL_SCALES) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(cin, channels, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in range(3))
        self.fpn_bottleneck = ConvModule(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, classes, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        top = maps[-1]
        pooled = [top] + [_resize(module(top), top.shape[2:]) for module in self.psp_modules]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, maps[:-1], strict=True)]
        laterals.append(self.bottleneck(torch.cat(pooled, dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(x, size) for x in outs[1:]], dim=1))
        return self.conv_seg(self.dropout(fused))


class FCNHead(nn.Module):
    """mmseg's FCNHead with one conv, as the released auxiliary head: a map -> logits."""

    def __init__(self, cin: int, channels: int, classes: int):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(cin, channels, 3))
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


class LinearHead(nn.Module):
    """The cheap baseline: one 1x1 conv on the last block's map."""

    def __init__(self, cin: int, classes: int):
        super().__init__()
        self.conv_seg = nn.Conv2d(cin, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(x)


class BeitSegmenter(BeitBackbone):
    """Semantic segmentation: cfg.num_classes classes at cfg.image_size (the crop)."""

    head_prefixes = ("fpn1.", "fpn2.", "decode_head.", "auxiliary_head.")  # new heads, not in a backbone checkpoint

    def __init__(
        self,
        cfg: ModelConfig,
        head: str = "upernet",
        channels: int = 0,
        aux_channels: int = 256,
        out_indices: tuple[int, ...] | None = None,
    ):
        super().__init__(cfg, shared_bias=False)
        if head not in ("upernet", "linear"):
            raise ValueError(f"head {head!r} is not one of upernet, linear.")
        d, classes = self.cfg.width, self.cfg.num_classes
        self.head = head
        self.out_indices = tuple(out_indices or default_out_indices(self.cfg.depth))
        if len(self.out_indices) != 4 or not all(0 <= i < self.cfg.depth for i in self.out_indices):
            raise ValueError(f"out_indices {self.out_indices} must be 4 blocks of 0..{self.cfg.depth - 1}.")
        patch = self.cfg.patch_size
        if patch & (patch - 1):
            raise ValueError(
                f"model.patch_size {patch} is not a power of two: the segmenter's neck makes maps at 1/4 to 1/32 "
                "of the input from the patch grid; use a patch size of 4, 8, 16 or 32."
            )
        self.init_weights(conv=False)
        if head == "upernet":  # the linear head takes the last block's map as it is
            self.fpn1, self.fpn2, self.fpn3, self.fpn4 = (neck_level(d, patch, s) for s in NECK_STRIDES)
            self.decode_head = UperHead(d, channels or d, classes)
            self.auxiliary_head = FCNHead(d, aux_channels, classes)
        else:
            self.decode_head = LinearHead(d, classes)
            self.auxiliary_head = None
        for module in (self.decode_head, self.auxiliary_head):
            if module is not None:
                nn.init.normal_(module.conv_seg.weight, std=0.01)  # mmseg's init of the classifier
                nn.init.zeros_(module.conv_seg.bias)

    def grid_maps(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> the `out_indices` blocks' patch tokens as maps [B, D, H/patch, W/patch]."""
        layers = self.encode(pixels, return_layers=True)
        gh, gw = pixels.shape[2] // self.cfg.patch_size, pixels.shape[3] // self.cfg.patch_size
        return [layers[i][:, 1:].transpose(1, 2).reshape(pixels.shape[0], -1, gh, gw) for i in self.out_indices]

    def pyramid(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> four maps [B, D, H/4 .. H/32] (the neck's outputs; UperNet only)."""
        necks = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        return [neck(x) for neck, x in zip(necks, self.grid_maps(pixels), strict=True)]

    def forward_heads(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(main logits at the head's resolution, auxiliary logits or None)."""
        if self.head == "linear":
            return self.decode_head(self.grid_maps(pixels)[-1]), None
        maps = self.pyramid(pixels)
        aux = self.auxiliary_head(maps[2]) if self.training else None
        return self.decode_head(maps), aux

    def forward(self, pixels: torch.Tensor, heads: bool = False):
        """[B, 3, H, W] -> logits [B, classes, H, W]; with `heads`, `forward_heads`' pair (what
        the loss takes: a DDP-wrapped model is called through its forward)."""
        if heads:
            return self.forward_heads(pixels)
        return _resize(self.forward_heads(pixels)[0], pixels.shape[2:])

    def layer_id(self, name: str) -> int:
        """The released layer ids for layer-wise lr decay: patch embed and cls token 0, block i is
        i + 1, the neck and heads depth + 1."""
        if name.startswith(("cls_token", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.cfg.depth + 1


def pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy of logits [B, C, H, W] against labels [B, H, W], averaged over every pixel
    with ignored ones counting 0, as the released mmseg (0.x, and later ones' default
    avg_non_ignore=False) averages it."""
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none").mean()


def segmentation_loss(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255):
    """The main head's loss plus 0.4 x the auxiliary head's, each head's logits upsampled to the
    labels' size first (mmseg's decode and auxiliary losses); `model` a BeitSegmenter, or it
    wrapped in DDP. Returns (loss, main logits at the labels' size)."""
    main, aux = model(pixels, heads=True)
    main = _resize(main, labels.shape[1:])
    loss = pixel_cross_entropy(main, labels, ignore_index)
    if aux is not None:
        loss = loss + AUX_WEIGHT * pixel_cross_entropy(_resize(aux, labels.shape[1:]), labels, ignore_index)
    return loss, main
