"""BEiT with UperNet as released: the neck's scales, logits at the input size, transformers'
BeitForSemanticSegmentation given the same weights, layer-wise learning rates, and loading a
backbone checkpoint."""

import pytest
import torch
from hf_reference import huggingface_segmenter_logits, huggingface_segmenter_twin

from beit.shared.checkpoint import load_pretrained, save_checkpoint
from beit.train.model import BeitClassifier, BeitForMIM, ModelConfig
from beit.train.segment.model import BeitSegmenter, default_out_indices, pixel_cross_entropy, segmentation_loss

TINY = dict(preset="tiny", width=32, depth=4, heads=2, image_size=64, num_classes=5, drop_path=0.0)


def test_the_neck_gives_four_scales_and_the_logits_the_input_size():
    torch.manual_seed(0)
    model = BeitSegmenter(ModelConfig(**TINY), aux_channels=16).eval()
    pixels = torch.randn(2, 3, 64, 64)
    maps = model.pyramid(pixels)
    assert [tuple(m.shape[2:]) for m in maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]  # 1/4, 1/8, 1/16, 1/32
    assert all(m.shape[:2] == (2, 32) for m in maps)
    assert model(pixels).shape == (2, 5, 64, 64)
    linear = BeitSegmenter(ModelConfig(**TINY), head="linear").eval()
    assert linear(pixels).shape == (2, 5, 64, 64) and linear.auxiliary_head is None
    assert linear.forward_heads(pixels)[0].shape == (2, 5, 4, 4)  # the last block's grid, no neck
    assert not any(name.startswith("fpn") for name, _ in linear.named_parameters())
    # other patch sizes: the same four strides of the input (a patch-4 model's finest map is its grid)
    for patch, ups in ((8, [1, 0, 0, 0]), (4, [0, 0, 0, 0])):
        small = BeitSegmenter(ModelConfig(**{**TINY, "patch_size": patch}), aux_channels=16).eval()
        maps = small.pyramid(pixels)
        assert [tuple(m.shape[2:]) for m in maps] == [(16, 16), (8, 8), (4, 4), (2, 2)], patch
        convs = [
            sum(isinstance(m, torch.nn.ConvTranspose2d) for m in neck.modules())
            for neck in (small.fpn1, small.fpn2, small.fpn3, small.fpn4)
        ]
        assert convs == ups and small(pixels).shape == (2, 5, 64, 64)
    with pytest.raises(ValueError, match="patch_size 6 is not a power of two"):
        BeitSegmenter(ModelConfig(**{**TINY, "patch_size": 6, "image_size": 60}))
    assert default_out_indices(12) == (3, 5, 7, 11) and default_out_indices(24) == (7, 11, 15, 23)
    assert default_out_indices(4) == (0, 1, 2, 3) and default_out_indices(8) == (1, 3, 5, 7)


def test_the_auxiliary_head_adds_four_tenths_of_its_loss_in_training():
    torch.manual_seed(0)
    model = BeitSegmenter(ModelConfig(**TINY), aux_channels=16).train()
    pixels, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    labels[:, :8] = 255
    torch.manual_seed(1)
    loss, main = segmentation_loss(model, pixels, labels)
    torch.manual_seed(1)
    main_logits, aux = model.forward_heads(pixels)
    resize = lambda x: torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)  # noqa: E731
    expected = pixel_cross_entropy(resize(main_logits), labels) + 0.4 * pixel_cross_entropy(resize(aux), labels)
    torch.testing.assert_close(loss, expected)
    # ignored pixels count 0 in the mean over every pixel, as mmseg's default (avg_non_ignore=False)
    full = torch.nn.functional.cross_entropy(resize(main_logits), labels, ignore_index=255, reduction="sum")
    torch.testing.assert_close(pixel_cross_entropy(resize(main_logits), labels), full / labels.numel())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_matches_transformers_semantic_segmentation_with_the_same_weights():
    torch.manual_seed(0)
    model = BeitSegmenter(ModelConfig(**TINY), aux_channels=16)
    with torch.no_grad():  # non-trivial norms and running statistics, so a mismatch shows
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        model.decode_head.conv_seg.weight.normal_(std=1.0)  # logits of order 1, not mmseg's 0.01 init
    model.eval()
    hf = huggingface_segmenter_twin(model)
    pixels = torch.randn(2, 3, 64, 64)
    taken = []
    hf.fpn.register_forward_hook(lambda module, inputs, output: taken.extend(inputs[0]))
    with torch.no_grad():
        ours, _ = model.forward_heads(pixels)
        theirs = huggingface_segmenter_logits(hf, pixels, model.out_indices)
        their_own = hf(pixel_values=pixels).logits
        blocks = [x[:, 1:].transpose(1, 2).reshape(2, -1, 4, 4) for x in model.encode(pixels, return_layers=True)]
    assert ours.shape == theirs.shape == their_own.shape == (2, 5, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    own = taken[4:]  # the maps its own forward fed its neck
    for k, block in enumerate(model.out_indices[1:], start=1):
        torch.testing.assert_close(own[k], blocks[block - 1], rtol=1e-5, atol=1e-5)
    # What we found: transformers 5 takes feature map k from hidden_states[out_indices[k] - 1],
    # and hidden_states[0] is the embedding output, so out_indices [4, 6, 8, 12] (unilm's blocks
    # 3, 5, 7, 11 counted from 1) take the outputs of blocks 2, 4, 6, 10; the last block's output
    # needs index 13, which its config refuses (indices run 0..depth, in order). Its own forward
    # is therefore one block early (block 0's map is the embedding output): equal weights, other logits.
    assert not torch.allclose(their_own, ours, rtol=1e-4, atol=1e-4)


def test_layer_ids_put_the_neck_and_heads_at_the_top():
    model = BeitSegmenter(ModelConfig(**TINY), aux_channels=16)
    ids = {name: model.layer_id(name) for name, _ in model.named_parameters()}
    assert ids["cls_token"] == ids["patch_embed.proj.weight"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.3.mlp.fc2.bias"] == 4
    assert all(ids[n] == 5 for n in ids if n.startswith(("fpn", "decode_head", "auxiliary_head")))


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_a_backbone_checkpoint_loads_with_its_tables_resized_and_new_heads(tmp_path, kind):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, "image_size": 32, "vocab_size": 64, "num_classes": 3})
    source = BeitForMIM(cfg) if kind == "pretrain" else BeitClassifier(cfg)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": source.state_dict()}, {"kind": kind, "model": {}})
    model = BeitSegmenter(ModelConfig(**TINY), aux_channels=16)
    notes = " ".join(load_pretrained(model, path))
    assert "resized relative position tables from a 2x2 to a 4x4 grid" in notes
    assert "auxiliary_head, decode_head, fpn1, fpn2 start from the model's initialisation" in notes
    torch.testing.assert_close(model.blocks[2].mlp.fc1.weight, source.blocks[2].mlp.fc1.weight)
