"""`beit attention` and `beit mask`: the attention weights are the ones the model uses, the
pictures are written, and a mask greys out exactly its patches."""

import math

import numpy as np
import pytest
import torch
from helpers import beit_here, copy_photos
from PIL import Image

from beit.shared.checkpoint import save_checkpoint
from beit.shared.config import to_dict
from beit.shared.counter import counter_key
from beit.shared.images import read_image
from beit.train.model import BeitClassifier, BeitForMIM, ModelConfig
from beit.train.pretrain.data import SamplePlan, Sampling
from beit.train.pretrain.masking import block_masks, random_masks
from beit.train.pretrain.pictures import (
    GREY,
    GREY_WEIGHT,
    attention_maps,
    attention_picture,
    attention_weights,
    load_model,
    mask_picture,
    masked_view,
    resolve_layer,
)

TINY = dict(preset="custom", image_size=32, patch_size=8, width=32, depth=3, heads=4, vocab_size=64, num_classes=5)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere (the released init leaves tables and biases at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def released_bias(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[heads, 1 + N, 1 + N] relative position bias, looked up entry by entry as unilm writes it."""
    gh, gw = grid
    rows = (2 * gh - 1) * (2 * gw - 1) + 3
    n = gh * gw + 1
    bias = torch.empty(table.shape[1], n, n)
    for i in range(n):
        for j in range(n):
            if i == 0 and j == 0:
                row = rows - 1
            elif i == 0:
                row = rows - 3
            elif j == 0:
                row = rows - 2
            else:
                (ri, ci), (rj, cj) = divmod(i - 1, gw), divmod(j - 1, gw)
                row = (ri - rj + gh - 1) * (2 * gw - 1) + (ci - cj + gw - 1)
            bias[:, i, j] = table[row]
    return bias


@torch.no_grad()
def explicit_attention(model, pixels: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block `layer`'s attention probabilities [heads, 1 + N, 1 + N] for one image, written out:
    patches by matrix product, the blocks before it run one by one, then per head
    softmax(q k^T / sqrt(d) + bias). Also returns the block's normalised input."""
    cfg = model.cfg
    p = cfg.patch_size
    patches = pixels.unfold(1, p, p).unfold(2, p, p).permute(1, 2, 0, 3, 4).reshape(-1, 3 * p * p)
    x = patches @ model.patch_embed.proj.weight.reshape(cfg.width, -1).T + model.patch_embed.proj.bias
    x = torch.cat([model.cls_token[0], x])[None]
    tables = [
        b.attn.relative_position_bias_table
        if b.attn.relative_position_bias_table is not None
        else model.rel_pos_bias.relative_position_bias_table
        for b in model.blocks
    ]
    shared = released_bias(tables[0], cfg.grid) if isinstance(model, BeitForMIM) else None
    for block in model.blocks[:layer]:
        x = block(x, shared)
    block = model.blocks[layer]
    x = block.norm1(x)[0]
    weight, dim, head_dim = block.attn.qkv.weight, cfg.width, cfg.width // cfg.heads
    q = x @ weight[:dim].T + block.attn.q_bias
    k = x @ weight[dim : 2 * dim].T
    bias = released_bias(tables[layer], cfg.grid)
    probs = []
    for h in range(cfg.heads):
        cut = slice(h * head_dim, (h + 1) * head_dim)
        scores = q[:, cut] @ k[:, cut].T / math.sqrt(head_dim) + bias[h]
        probs.append(scores.softmax(-1))
    return torch.stack(probs), x[None]


@pytest.mark.parametrize("kind", [BeitForMIM, BeitClassifier])
def test_attention_maps_equal_an_explicit_computation(kind):
    model = randomized(kind(ModelConfig(**TINY)), seed=1)
    pixels = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(2))
    queries = [(0, 0), (1, 2), (3, 3), (2, 0)]
    mask = torch.tensor([[i % 3 == 0 for i in range(16)]])
    forward = (lambda: model(pixels[None], mask)) if kind is BeitForMIM else (lambda: model(pixels[None]))
    with torch.no_grad():
        before = forward()
    for layer in range(model.cfg.depth):
        expected, normed = explicit_attention(model, pixels, layer)
        torch.testing.assert_close(expected.sum(-1), torch.ones(model.cfg.heads, 17))
        block = model.blocks[layer]
        shared = model.rel_pos_bias() if kind is BeitForMIM else None
        with torch.no_grad():
            weights = attention_weights(block.attn, normed, shared)
            # the weights are the ones the model attends with: they give its attention output
            v = (normed @ block.attn.qkv.weight[64:].T + block.attn.v_bias).view(1, 17, 4, 8).transpose(1, 2)
            out = block.attn.proj((weights @ v).transpose(1, 2).reshape(1, 17, 32))
            torch.testing.assert_close(out, block.attn(normed, shared), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weights[0], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4, 17))

        maps = attention_maps(model, pixels, layer, queries)
        assert maps.shape == (4, 4, 4)
        rows = torch.tensor([1 + r * 4 + c for r, c in queries])
        torch.testing.assert_close(maps, expected.mean(0)[rows, 1:].reshape(4, 4, 4), atol=1e-5, rtol=1e-5)
        assert torch.all(maps.flatten(1).sum(1) < 1) and torch.all(maps.flatten(1).sum(1) > 0.5)
        assert (maps[0] - maps[2]).abs().max() > 1e-3  # different queries, different maps
    assert all(not b.attn._forward_pre_hooks for b in model.blocks)  # the hook is gone
    with torch.no_grad():
        torch.testing.assert_close(forward(), before, atol=0, rtol=0)  # the ordinary forward is unchanged


def test_layers_and_queries_are_checked():
    model = BeitForMIM(ModelConfig(**TINY)).eval()
    assert [resolve_layer(k, 3) for k in (1, 3, -1, -3)] == [0, 2, 2, 0]
    for bad in (0, 4, -4):
        with pytest.raises(ValueError, match="not a block"):
            resolve_layer(bad, 3)
    with pytest.raises(ValueError, match="outside the 4x4 patch grid"):
        attention_maps(model, torch.zeros(3, 32, 32), 0, [(4, 0)])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return copy_photos(tmp_path_factory.mktemp("photos"), ["astronaut.png", "coffee.png"])


def test_attention_command_writes_the_picture(photos, tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY).resolved()
    checkpoint = save_checkpoint(
        tmp_path / "pt" / "checkpoint.pt",
        {"model": randomized(BeitForMIM(cfg)).state_dict()},
        {"kind": "pretrain", "model": to_dict(cfg)},
    )
    out = tmp_path / "attention.png"
    result = beit_here("attention", checkpoint, *photos, "-o", out, "--query", "1,2", "--query", "3,0", "--layer", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("x uniform") == 4 and f"wrote {out}" in result.stdout
    with Image.open(out) as image:
        assert image.size == (720, 500)  # 3 columns x 2 rows at 240 x 250 pixels
        assert np.asarray(image.convert("L")).std() > 20

    bad = beit_here("attention", checkpoint, photos[0], "-o", out, "--query", "4,4")
    assert bad.returncode == 1 and "outside the 4x4 patch grid" in bad.stderr and "Traceback" not in bad.stderr

    # a fine-tuned checkpoint draws too (in-process: the command path is the same)
    classifier = save_checkpoint(
        tmp_path / "ft" / "best.pt",
        {"model": randomized(BeitClassifier(cfg)).state_dict()},
        {"kind": "finetune", "model": to_dict(cfg)},
    )
    summaries = attention_picture(load_model(classifier), photos[:1], tmp_path / "ft.png")
    assert [s["query"] for s in summaries[0]] == [(2, 2), (1, 1), (1, 3), (3, 2)]
    # 8 seeds of the randomised model on AMD EPYC (2026-11-30, tests/calibration/seeds.py pictures): lowest peak
    # min 2.28, median 3.59 x uniform; threshold = min - 0.78 (1/3 of min). Highest entropy max 0.965,
    # median 0.84 of log N; the threshold is the bound itself (1 = uniform): the maps are not uniform.
    assert all(s["peak"] > 1.5 and s["entropy"] < 1 for s in summaries[0])
    assert (tmp_path / "ft.png").stat().st_size > 0


def test_mask_command_writes_the_picture(photos, tmp_path):
    out = tmp_path / "masks.png"
    result = beit_here("mask", photos[1], "-o", out, "--grid", "8", "--count", "20", "--samples", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("of 64 patches masked in") == 3
    with Image.open(out) as image:
        assert image.size == (1040, 300)  # the image and 3 samples at 260 x 300 pixels
    with pytest.raises(ValueError, match="between 1 and the 16 patches"):
        mask_picture(photos[1], out, grid=4, count=17)


@pytest.mark.parametrize("random", [False, True])
def test_masks_grey_out_exactly_the_masked_patches(photos, tmp_path, random):
    masks, panels, blocks = mask_picture(photos[0], tmp_path / "m.png", grid=7, count=20, seed=3, random=random)
    # the training sampler, keyed as pre-training keys images 0..3 of epoch 0 under seed 3
    keys = counter_key(3, 0, np.arange(4), 2)
    expected = random_masks(keys, (7, 7), 20) if random else block_masks(keys, (7, 7), 20, min_block=4)
    # and what SamplePlan itself gives those images (min_block 4 is its default for 7x7)
    plan = SamplePlan(np.arange(4), 1, (7, 7), Sampling(4, seed=3, mask="random" if random else "block", mask_count=20))
    images, _, planned = plan.at(0)
    for image, want in zip(images, planned, strict=True):
        np.testing.assert_array_equal(masks[image].reshape(-1), want)
    original = (read_image(photos[0], 224).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    greyed = np.round(original * (1 - GREY_WEIGHT) + GREY * GREY_WEIGHT).astype(np.uint8)
    for mask, want, panel, drawn in zip(masks, expected, panels, blocks, strict=True):
        np.testing.assert_array_equal(mask, want)
        assert mask.sum() == 20 if random else 0 < mask.sum() <= 20
        if not random:  # the blocks drawn cover the mask and nothing else
            union = np.zeros((7, 7), dtype=bool)
            for b in drawn:
                union[b.top : b.top + b.height, b.left : b.left + b.width] = True
            np.testing.assert_array_equal(union, mask)
        else:
            assert drawn == []
        for r in range(7):
            for c in range(7):
                cut = np.s_[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32]
                np.testing.assert_array_equal(panel[cut], greyed[cut] if mask[r, c] else original[cut])
    assert (tmp_path / "m.png").stat().st_size > 0


def test_masked_view_follows_rows_and_columns():
    image = np.full((4, 6, 3), 255, dtype=np.uint8)
    mask = np.array([[False, True, False], [False, False, False]])  # 2 x 3 patches of 2 x 2 pixels
    out = masked_view(image, mask)
    changed = np.argwhere((out != image).any(-1))
    assert changed.min(0).tolist() == [0, 2] and changed.max(0).tolist() == [1, 3]
    assert out[0, 2].tolist() == [172, 172, 172]  # 255 * 0.35 + 128 * 0.65, rounded


def test_missing_matplotlib_is_one_clear_error(photos, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(ValueError, match="need matplotlib: pip install"):
        mask_picture(photos[0], tmp_path / "m.png", grid=4, count=4)
