import math

import numpy as np
import pytest
import torch

from beit.train.model import PRESETS, BeitClassifier, BeitForMIM, ModelConfig, mim_loss
from beit.train.pretrain.masking import block_mask

TINY = dict(preset="custom", image_size=48, patch_size=8, width=64, depth=3, heads=4, vocab_size=96, num_classes=7)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (the released init leaves tables and biases at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def masks(batch: int, grid: tuple[int, int], count_: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([block_mask(rng, grid, count_).reshape(-1) for _ in range(batch)]))


def test_base_parameter_counts_match_the_released_models():
    assert count(BeitForMIM(ModelConfig(preset="base"))) == 91_965_776
    assert count(BeitClassifier(ModelConfig(preset="base", num_classes=1000))) == 86_530_984


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_have_the_vit_sizes(name):
    width, depth, heads, layer_scale = PRESETS[name]
    cfg = ModelConfig(preset=name).resolved()
    assert (cfg.width, cfg.depth, cfg.heads, cfg.layer_scale) == (width, depth, heads, layer_scale)
    assert cfg.grid == (14, 14)


def test_custom_sizes_and_bad_sizes():
    cfg = ModelConfig(preset="tiny", image_size=96, patch_size=8, depth=2).resolved()
    assert (cfg.width, cfg.depth, cfg.grid) == (192, 2, (12, 12))
    with pytest.raises(ValueError, match="not a multiple of model.patch_size"):
        ModelConfig(preset="tiny", image_size=100).resolved()
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig(preset="huge").resolved()


def test_released_init():
    model = BeitForMIM(ModelConfig(preset="tiny", depth=4, drop_path=0.1))
    std = lambda t: t.float().std().item()  # noqa: E731
    for layer_id, block in enumerate(model.blocks, start=1):
        assert std(block.attn.proj.weight) == pytest.approx(0.02 / math.sqrt(2 * layer_id), rel=0.05)
        assert std(block.mlp.fc2.weight) == pytest.approx(0.02 / math.sqrt(2 * layer_id), rel=0.05)
        assert std(block.mlp.fc1.weight) == pytest.approx(0.02, rel=0.05)
        assert torch.all(block.gamma_1 == 0.1)
    assert model.blocks[0].drop_path_rate == 0.0 and model.blocks[-1].drop_path_rate == pytest.approx(0.1)
    assert std(model.lm_head.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.patch_embed.proj.weight) == pytest.approx(0.02, rel=0.05)
    classifier = BeitClassifier(ModelConfig(preset="tiny", depth=2, num_classes=1000))
    assert std(classifier.head.weight) == pytest.approx(0.02 * 0.001, rel=0.05)


def test_every_parameter_gets_a_gradient_in_a_mim_step():
    model = BeitForMIM(ModelConfig(**TINY, drop_path=0.0))
    pixels = torch.randn(4, 3, 48, 48)
    mask = masks(4, (6, 6), 14)
    targets = torch.randint(0, 96, (4, 36))
    mim_loss(model(pixels, mask), targets, mask).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_every_parameter_gets_a_gradient_in_a_classification_step():
    model = BeitClassifier(ModelConfig(**TINY, drop_path=0.0))
    logits = model(torch.randn(4, 3, 48, 48))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mim_loss_is_cross_entropy_over_masked_positions_only():
    torch.manual_seed(0)
    model = BeitForMIM(ModelConfig(**TINY)).eval()
    randomize(model)
    pixels = torch.randn(3, 3, 48, 48)
    mask = masks(3, (6, 6), 14, seed=1)
    targets = torch.randint(0, 96, (3, 36))
    loss = mim_loss(model(pixels, mask), targets, mask)

    all_logits = model.lm_head(model.norm(model.encode(pixels, mask, model.mask_token))[:, 1:])
    log_probs = all_logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    expected = -(log_probs * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)

    other = targets.clone()
    other[~mask] = (other[~mask] + 1) % 96  # change every unmasked target: the loss must not move
    assert mim_loss(model(pixels, mask), other, mask).item() == pytest.approx(loss.item(), abs=1e-6)


def test_masked_positions_see_only_the_mask_token():
    """A masked patch's pixels must not reach the model: changing them leaves the output alone."""
    model = BeitForMIM(ModelConfig(**TINY)).eval()
    randomize(model)
    pixels = torch.randn(1, 3, 48, 48)
    mask = torch.zeros(1, 36, dtype=torch.bool)
    mask[0, 0] = True
    changed = pixels.clone()
    changed[:, :, :8, :8] += 5.0  # patch 0
    torch.testing.assert_close(model(pixels, mask), model(changed, mask))


def test_pretraining_model_matches_huggingface():
    from hf_reference import huggingface_twin

    model = BeitForMIM(ModelConfig(**TINY)).eval()
    randomize(model, seed=1)
    hf = huggingface_twin(model)
    pixels = torch.randn(2, 3, 48, 48)
    mask = masks(2, (6, 6), 14, seed=2)
    with torch.no_grad():
        ours = model(pixels, mask)
        theirs = hf(pixel_values=pixels, bool_masked_pos=mask).logits[mask]
    assert (ours - theirs).abs().max().item() < 1e-4


def test_classifier_matches_huggingface():
    from hf_reference import huggingface_twin

    model = BeitClassifier(ModelConfig(**TINY)).eval()
    randomize(model, seed=2)
    hf = huggingface_twin(model)
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ours = model(pixels)
        theirs = hf(pixel_values=pixels).logits
    assert ours.abs().max() > 0.1  # a real comparison, not of zeros
    assert (ours - theirs).abs().max().item() < 1e-4


def test_relative_position_bias_distinguishes_cls_rows():
    from beit.train.model import relative_position_index

    index = relative_position_index((3, 4))
    rows = (2 * 3 - 1) * (2 * 4 - 1) + 3
    assert index[0, 0] == rows - 1 and index[0, 1] == rows - 3 and index[1, 0] == rows - 2
    assert index[1:, 1:].max() < rows - 3
    assert torch.all(index[1:, 1:].diagonal() == index[1, 1])  # zero offset -> one row


def test_static_masked_positions_give_the_flat_paths_logits_loss_and_gradients():
    """The trainer's static-shape step (each image's masked patches padded to K, the padding
    ignored) computes what the flat path over the M masked patches computes."""
    from beit.train.pretrain.masking import masked_positions
    from beit.train.pretrain.trainer import mim_step_loss

    torch.manual_seed(0)
    model = BeitForMIM(ModelConfig(preset="tiny", image_size=64, vocab_size=96, drop_path=0.0))
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 16), dtype=bool)
    for i in range(6):  # the images mask different numbers of patches, 2 to 7 (a block mask may stop short)
        masks[i, rng.choice(16, size=i + 2, replace=False)] = True
    positions, valid = (torch.from_numpy(a) for a in masked_positions(masks, 7))
    mask = torch.from_numpy(masks)
    pixels, targets = torch.randn(6, 3, 64, 64), torch.randint(0, 96, (6, 16))

    flat = model(pixels, mask)
    static = model(pixels, mask, positions=positions)
    assert static.shape == (6, 7, 96) and int(valid.sum()) == flat.shape[0] == int(mask.sum())
    torch.testing.assert_close(static[valid], flat, rtol=1e-5, atol=1e-5)
    flat_loss = mim_loss(flat, targets, mask)
    static_loss, correct, count = mim_step_loss(model, pixels, mask, positions, valid, targets, 16)
    torch.testing.assert_close(static_loss, flat_loss, rtol=1e-6, atol=1e-6)
    assert int(count) == int(mask.sum())
    assert int(correct) == int((flat.argmax(-1) == targets[mask]).sum())
    flat_grads = torch.autograd.grad(flat_loss, list(model.parameters()))
    static_grads = torch.autograd.grad(static_loss, list(model.parameters()))
    for a, b in zip(flat_grads, static_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    # pixel targets: the mean squared error over the masked patches alone
    model.lm_head = torch.nn.Linear(model.cfg.width, 16 * 16 * 3)
    from beit.train.pretrain.trainer import pixel_targets

    for normalised in (False, True):
        patches = pixel_targets(pixels, 16, normalised).flatten(0, 1)[mask.flatten()]
        flat_mse = torch.nn.functional.mse_loss(model(pixels, mask), patches)
        static_mse, _, _ = mim_step_loss(model, pixels, mask, positions, valid, None, 16, normalised)
        torch.testing.assert_close(static_mse, flat_mse, rtol=1e-6, atol=1e-6)
    # the paper's target is the input's own pixels, patch by patch; the normalised one has each
    # patch at mean 0 and variance 1
    raw = pixel_targets(pixels, 16)
    torch.testing.assert_close(raw[1, 3].view(16, 16, 3).permute(2, 0, 1), pixels[1, :, 0:16, 48:64])
    normalised = pixel_targets(pixels, 16, normalised=True)
    torch.testing.assert_close(normalised.mean(-1), torch.zeros(normalised.shape[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalised.var(-1), torch.ones(normalised.shape[:2]), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="more than the 3 positions"):
        masked_positions(masks, 3)
