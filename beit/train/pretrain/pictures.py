"""Pictures of what BEiT sees and what it is asked to predict (matplotlib).

    beit attention RUN_DIR/checkpoint.pt photo.jpg -o attention.png --query 7,7 --layer -1
    beit mask photo.jpg -o masks.png --grid 14 --count 75 --samples 4

`beit attention`: self-attention maps for chosen query patches, as in the BEiT paper's
Figure 2. The image's shorter side is resized to the model's image size (Lanczos), the
centre square is kept (all of it: no 0.875 evaluation crop), and it is normalised with the
ImageNet mean and std, as training normalises. The maps are the
attention probabilities of one block, averaged over heads, from each query patch to every
patch token (the cls column is left out and the rest is not renormalised, so a map sums to
1 minus what the query gives the cls token). The model attends with
`scaled_dot_product_attention`, which returns no weights, so `attention_weights` recomputes
them from the block's own q/k, q bias, scale and relative position bias while an ordinary
forward pass runs; the model's forward path is untouched.

`beit mask`: samples of the blockwise mask (or the uniform random one) pre-training draws,
over the image resized to a square: masked patches are greyed out. They are drawn with
pre-training's own batched sampler and keys, so each is exactly a mask pre-training with that
seed draws (`mask_picture` says which).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from beit.shared.checkpoint import CheckpointError, load_checkpoint, load_weights
from beit.shared.counter import counter_key
from beit.shared.images import read_image
from beit.shared.views import imagenet_stats
from beit.train.model import Attention, BeitClassifier, BeitForMIM, ModelConfig
from beit.train.pretrain.masking import Block, block_masks, random_masks

GREY = 128  # what a masked patch is blended towards
GREY_WEIGHT = 0.65  # how far: Fashion-MNIST's black backgrounds must show their masks too
MASK_SIDE = 224  # pixels of the mask picture's square image (rounded to whole patches)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("beit's pictures need matplotlib: pip install 'beit[plot]' (or matplotlib).") from None
    return plt


# ---------------------------------------------------------------- attention


def load_model(path: Path) -> BeitForMIM | BeitClassifier:
    """The model of a `beit pretrain` (BeitForMIM) or `beit finetune` (BeitClassifier)
    checkpoint, built from the config it records, in eval mode on the CPU."""
    state, meta = load_checkpoint(path)
    kind = meta.get("kind")
    if kind not in ("pretrain", "finetune") or "model" not in meta:
        raise CheckpointError(
            f"{path} records no model config (kind {kind!r}): pass a checkpoint.pt written by "
            "`beit pretrain` or `beit finetune`."
        )
    model = (BeitForMIM if kind == "pretrain" else BeitClassifier)(ModelConfig(**meta["model"]))
    load_weights(model, state["model"], source=str(path))
    return model.eval()


def read_pixels(path: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An image file -> ([3, size, size] in [0, 1] to show, the same ImageNet-normalised to feed)."""
    image = read_image(Path(path), size)
    mean, std = imagenet_stats()
    return image, (image - mean) / std


def attention_weights(attn: Attention, x: torch.Tensor, shared_bias: torch.Tensor | None) -> torch.Tensor:
    """What `attn` computes inside scaled_dot_product_attention, written out:
    x [B, 1 + N, D] (the block's normalised input) -> probabilities [B, heads, 1 + N, 1 + N]."""
    batch, n, dim = x.shape
    head_dim = dim // attn.heads
    bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    qkv = torch.nn.functional.linear(x, attn.qkv.weight, bias).view(batch, n, 3, attn.heads, head_dim)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).float().unbind(0)
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
    position_bias = attn.own_bias() if attn.relative_position_bias_table is not None else shared_bias
    if position_bias is not None:
        scores = scores + position_bias.unsqueeze(0).float()
    return scores.softmax(-1)


def resolve_layer(layer: int, depth: int) -> int:
    """A block number as users give it (1..depth, or -1 for the last, -2 the one before) -> 0-based."""
    if not (1 <= layer <= depth or -depth <= layer <= -1):
        raise ValueError(f"--layer {layer} is not a block of this {depth}-block model: use 1..{depth} or -1..-{depth}.")
    return layer - 1 if layer > 0 else depth + layer


def default_queries(grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Four patches spread over the grid: the centre and three quarter points."""
    gh, gw = grid
    return [(gh // 2, gw // 2), (gh // 4, gw // 4), (gh // 4, (3 * gw) // 4), ((3 * gh) // 4, gw // 2)]


@torch.no_grad()
def attention_maps(
    model: BeitForMIM | BeitClassifier, pixels: torch.Tensor, layer: int, queries: list[tuple[int, int]]
) -> torch.Tensor:
    """pixels [3, H, W] (normalised), a 0-based block index, query patches (row, col) ->
    [Q, gh, gw]: block `layer`'s attention probabilities from each query to every patch,
    averaged over heads (the cls column left out, not renormalised). Runs the model's own
    forward pass once, catching the block's attention input with a temporary hook."""
    gh, gw = model.cfg.grid
    for row, col in queries:
        if not (0 <= row < gh and 0 <= col < gw):
            raise ValueError(
                f"query patch {row},{col} is outside the {gh}x{gw} patch grid: use 0..{gh - 1},0..{gw - 1}."
            )
    attn = model.blocks[layer].attn
    caught: list[torch.Tensor] = []

    def catch(module: Attention, args: tuple, kwargs: dict) -> None:
        x = args[0]
        shared_bias = args[1] if len(args) > 1 else kwargs.get("shared_bias")
        caught.append(attention_weights(module, x, shared_bias))

    handle = attn.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        model.encode(pixels.unsqueeze(0))
    finally:
        handle.remove()
    weights = caught[0][0].mean(0)  # [1 + N, 1 + N], heads averaged
    rows = torch.tensor([1 + row * gw + col for row, col in queries])
    return weights[rows, 1:].reshape(len(queries), gh, gw)


def map_summary(attention: torch.Tensor) -> dict[str, float]:
    """How far one [gh, gw] map is from uniform, over the patches alone (renormalised):
    peak and low as multiples of the uniform 1/N, entropy as a fraction of log N (1 = uniform),
    and the share of the query's attention the cls token took."""
    patches = attention.sum().item()
    p = attention.flatten() / patches
    n = p.numel()
    entropy = -(p * p.clamp_min(1e-12).log()).sum().item()
    return {
        "peak": p.max().item() * n,
        "low": p.min().item() * n,
        "entropy": entropy / math.log(n),
        "cls": 1.0 - patches,
    }


def attention_picture(
    model: BeitForMIM | BeitClassifier,
    images: list[Path],
    out: Path,
    layer: int = -1,
    queries: list[tuple[int, int]] | None = None,
) -> list[list[dict]]:
    """Write the PNG: a row per image, the image with the query patches marked, then one heat
    map per query over the image. `layer` is a block number (1..depth, or -1 the last).
    Returns, per image, per query, `map_summary` plus the query."""
    cfg = model.cfg
    index = resolve_layer(layer, cfg.depth)
    queries = queries or default_queries(cfg.grid)
    side, patch = cfg.image_size, cfg.patch_size
    shown, maps = [], []
    for path in images:
        picture, pixels = read_pixels(path, side)
        shown.append(picture.permute(1, 2, 0).numpy())
        maps.append(attention_maps(model, pixels, index, queries))
    summaries = [
        [{"query": query, **map_summary(m)} for query, m in zip(queries, per_image, strict=True)] for per_image in maps
    ]

    plt = _pyplot()
    from matplotlib.patches import Rectangle

    colours = plt.get_cmap("tab10").colors
    columns = 1 + len(queries)
    figure, axes = plt.subplots(
        len(images), columns, figsize=(2.4 * columns, 2.5 * len(images)), squeeze=False, layout="constrained"
    )
    extent = (0, side, side, 0)  # pixel edges, so that a patch (r, c) spans [c p, (c + 1) p) across
    for row_axes, path, picture, per_image, rows in zip(axes, images, shown, maps, summaries, strict=True):
        row_axes[0].imshow(picture, extent=extent)
        row_axes[0].set_title(Path(path).name, fontsize=8)
        for q, ((r, c), attention, summary) in enumerate(zip(queries, per_image, rows, strict=True)):
            box = dict(width=patch, height=patch, fill=False, linewidth=2, edgecolor=colours[q % len(colours)])
            row_axes[0].add_patch(Rectangle((c * patch, r * patch), **box))
            axis = row_axes[1 + q]
            axis.imshow(picture.mean(-1), cmap="gray", extent=extent)
            axis.imshow(attention.numpy(), cmap="inferno", alpha=0.65, extent=extent, interpolation="nearest")
            axis.add_patch(Rectangle((c * patch, r * patch), **box))
            axis.set_title(f"query {r},{c}: peak {summary['peak']:.1f}x uniform", fontsize=8)
        for axis in row_axes:
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle(f"block {index + 1} of {cfg.depth}, heads averaged", fontsize=9)
    _save(figure, out, plt)
    return summaries


def _save(figure, out: Path, plt) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------- masks


def masked_view(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """image uint8 [S, S, 3], mask bool [gh, gw] (True = masked) -> the image with every masked
    patch blended towards grey; the other pixels are left exactly as they were."""
    gh, gw = mask.shape
    if image.shape[0] % gh or image.shape[1] % gw:
        raise ValueError(f"a {image.shape[1]}x{image.shape[0]} image does not split into a {gh}x{gw} patch grid.")
    pixels = np.kron(mask, np.ones((image.shape[0] // gh, image.shape[1] // gw), dtype=bool))
    out = image.copy()
    out[pixels] = np.round(image[pixels] * (1 - GREY_WEIGHT) + GREY * GREY_WEIGHT).astype(np.uint8)
    return out


def mask_picture(
    image: Path,
    out: Path,
    grid: int = 14,
    count: int = 0,
    seed: int = 0,
    random: bool = False,
    samples: int = 4,
) -> tuple[list[np.ndarray], list[np.ndarray], list[list[Block]]]:
    """Write the PNG: the image resized to a square of whole patches, then `samples` masks over
    it. Sample i is the mask pre-training (`SamplePlan.at`) draws for store image i in epoch 0
    under `seed` with a `count`-patch mask (0: BEiT's 75 of 196 patches scaled to the grid, as
    training's default): key `counter_key(seed, 0, i, 2)`, and for blocks
    training's default minimum block, BEiT's 16 of 196 patches scaled to the grid. Returns the
    masks [grid, grid], the panels drawn (uint8 [S, S, 3]) and each mask's blocks (empty for
    random)."""
    if grid < 1 or samples < 1:
        raise ValueError(f"--grid {grid} and --samples {samples} must both be at least 1.")
    count = count or max(1, round(75 * grid * grid / 196))  # SamplePlan's default, scaled to the grid
    side = grid * max(1, MASK_SIDE // grid)
    picture = (read_image(Path(image), side).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    keys = counter_key(seed, 0, np.arange(samples), 2)  # as SamplePlan.at keys images 0.. of epoch 0
    blocks: list[list[Block]] = []
    if random:
        drawn = random_masks(keys, (grid, grid), count)
        blocks = [[] for _ in range(samples)]
    else:
        min_block = max(1, round(16 * grid * grid / 196))  # SamplePlan's default, scaled to the grid
        drawn = block_masks(keys, (grid, grid), count, min_block=min_block, blocks=blocks)
    masks = list(drawn)
    panels = [masked_view(picture, mask) for mask in masks]

    plt = _pyplot()
    figure, axes = plt.subplots(1, 1 + samples, figsize=(2.6 * (1 + samples), 3.0), squeeze=False, layout="constrained")
    axes = axes[0]
    axes[0].imshow(picture)
    axes[0].set_title(Path(image).name, fontsize=8)
    for i, (axis, mask, panel, drawn) in enumerate(zip(axes[1:], masks, panels, blocks, strict=True)):
        axis.imshow(panel)
        how = "random" if random else f"{len(drawn)} blocks"
        axis.set_title(f"sample {i + 1}: {int(mask.sum())} masked, {how}", fontsize=8)
    lines = np.arange(0, side + 1, side // grid) - 0.5
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    for axis in axes[1:]:
        axis.vlines(lines, -0.5, side - 0.5, colors="white", linewidth=0.3, alpha=0.5)
        axis.hlines(lines, -0.5, side - 0.5, colors="white", linewidth=0.3, alpha=0.5)
    kind = "random" if random else "blockwise"
    figure.suptitle(f"{kind} mask: count {count} of a {grid}x{grid} grid ({grid * grid} patches), seed {seed}")
    _save(figure, out, plt)
    return masks, panels, blocks


# ---------------------------------------------------------------- predictions, during training


@torch.no_grad()
def mim_picture(model: BeitForMIM, pixels: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor,
                tokenizer=None, count: int = 4, cell: int = 96) -> np.ndarray:  # fmt: skip
    """uint8 [H, W, 3], one row per image (the first `count` of a batch: pixels [B, 3, S, S]
    ImageNet-normalised, mask [B, N] bool, target tokens [B, N]): the view, the view with its
    masked patches greyed, and the masked patches the model predicts right (green) or wrong (red);
    with a `tokenizer` that has its decoder, also the tokenizer's reconstruction of the targets and
    of the targets with the masked ones replaced by the model's predictions. Each panel `cell`
    pixels square. The model is run in eval mode and put back as it was."""
    from PIL import Image

    was_training = model.training
    model.eval()
    pixels, mask, tokens = pixels[:count].float(), mask[:count], tokens[:count]
    logits = model(pixels, mask)
    model.train(was_training)
    predicted = tokens.clone()
    predicted[mask] = logits.argmax(-1)
    gh, gw = model.cfg.grid
    mean, std = imagenet_stats(pixels.device)
    views = ((pixels * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    right, mask_np = (predicted == tokens).view(-1, gh, gw).cpu().numpy(), mask.view(-1, gh, gw).cpu().numpy()
    reconstructions = []
    if tokenizer is not None and tokenizer.decoder is not None:
        for grid in (tokens, predicted):
            made = tokenizer.reconstruct(grid.view(-1, gh, gw).cpu()).clamp(0, 1)
            reconstructions.append((made * 255).round().byte().permute(0, 2, 3, 1).numpy())

    def panel(array: np.ndarray, resample=Image.BILINEAR) -> np.ndarray:
        return np.asarray(Image.fromarray(array).resize((cell, cell), resample))

    rows = []
    for i in range(len(views)):
        hits = np.full((gh, gw, 3), 128, dtype=np.uint8)  # unmasked: grey
        hits[mask_np[i] & right[i]] = (40, 180, 60)
        hits[mask_np[i] & ~right[i]] = (200, 40, 40)
        panels = [panel(views[i]), panel(masked_view(views[i], mask_np[i])), panel(hits, Image.NEAREST)]
        panels += [panel(made[i]) for made in reconstructions]
        rows.append(np.pad(np.concatenate(panels, axis=1), ((0, 4), (0, 0), (0, 0)), constant_values=255))
    return np.concatenate(rows, axis=0)
