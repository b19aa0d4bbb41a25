import argparse
import json
import os
import pickle

import numpy as np
import pytest
import torch

from beit.shared.checkpoint import (
    CheckpointError,
    adapt_state_dict,
    load_checkpoint,
    load_pretrained,
    load_weights,
    previous,
    read_state_dict,
    resize_relative_position_table,
    save_checkpoint,
    to_timm,
)
from beit.train.model import BeitClassifier, BeitForMIM, ModelConfig

TINY = dict(preset="custom", image_size=48, patch_size=8, width=64, depth=3, heads=4, vocab_size=96, num_classes=7)


def randomized(model):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def unilm_state(model) -> dict:
    """The released layout: this project's names plus the relative_position_index buffers."""
    state = dict(model.state_dict())
    for name, buffer in model.named_buffers():
        if name.endswith("relative_position_index"):
            state[name] = buffer.clone()
    return state


def timm_keys(depth: int) -> set[str]:
    """State dict keys of timm's `Beit(use_abs_pos_emb=False, use_rel_pos_bias=True,
    global_pool='avg', init_values>0)`: timm keeps relative_position_index out (persistent=False)."""
    keys = {
        "cls_token",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "fc_norm.weight",
        "fc_norm.bias",
        "head.weight",
        "head.bias",
    }
    block = [
        "norm1.weight",
        "norm1.bias",
        "attn.q_bias",
        "attn.v_bias",
        "attn.relative_position_bias_table",
        "attn.qkv.weight",
        "attn.proj.weight",
        "attn.proj.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
        "gamma_1",
        "gamma_2",
    ]
    return keys | {f"blocks.{i}.{k}" for i in range(depth) for k in block}


def test_checkpoint_round_trip_with_json_meta(tmp_path):
    model = BeitForMIM(ModelConfig(**TINY))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 48, 48), torch.ones(2, 36, dtype=torch.bool)).sum().backward()
    opt.step()
    meta = {"kind": "pretrain", "step": 5, "config": {"model": {"depth": 3}}, "seed": 0}
    path = save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "optimizer": opt.state_dict()}, meta)
    state, meta_back = load_checkpoint(path)
    assert meta_back == meta
    assert json.loads((tmp_path / "ckpt.json").read_text()) == meta
    for k, v in model.state_dict().items():
        assert torch.equal(state["model"][k], v)
    opt2 = torch.optim.AdamW(BeitForMIM(ModelConfig(**TINY)).parameters())
    opt2.load_state_dict(state["optimizer"])
    assert sorted(os.listdir(tmp_path)) == ["ckpt.json", "ckpt.pt"]  # no temporary files left


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"model": {"w": torch.ones(3)}}, {"step": 1})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "bad": Boom()}, {"step": 2})
    state, meta = load_checkpoint(path)
    assert meta["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.json", "ckpt.pt"]


def test_a_checkpoint_changed_on_disk_is_refused_by_its_checksum(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"model": {"w": torch.full((4096,), 1.5)}}, {"step": 1})
    data = bytearray(path.read_bytes())
    at = data.find(torch.full((256,), 1.5).numpy().tobytes())  # the tensor's bytes, stored as they are
    assert at > 0
    data[at + 501] ^= 0x01  # one bit of one weight, as a bad disk or a partial copy changes it
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is damaged: its tensors no longer match the checksum"):
        load_checkpoint(path)


def test_the_runs_checkpoint_keeps_the_one_before_it(tmp_path):
    for step in (1, 2, 3):
        weights = {"model": {"w": torch.full((3,), float(step))}}
        save_checkpoint(tmp_path / "checkpoint.pt", weights, {"step": step}, keep_previous=True)
    assert load_checkpoint(tmp_path / "checkpoint.pt")[1]["step"] == 3
    assert load_checkpoint(previous(tmp_path / "checkpoint.pt"))[1]["step"] == 2
    assert json.loads((tmp_path / "checkpoint.previous.json").read_text())["step"] == 2
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint.json", "checkpoint.previous.json", "checkpoint.previous.pt", "checkpoint.pt"
    ]  # fmt: skip


def test_unilm_pretrained_checkpoint_becomes_a_classifier_with_per_layer_tables(tmp_path):
    mim = randomized(BeitForMIM(ModelConfig(**TINY)))
    args = argparse.Namespace(model="beit_base_patch16_224_8k_vocab", lr=1.5e-3)
    torch.save(
        {"model": unilm_state(mim), "args": args, "epoch": 799, "max_accuracy": np.float64(83.2)}, tmp_path / "pt.pth"
    )

    classifier = BeitClassifier(ModelConfig(**TINY)).eval()
    notes = load_pretrained(classifier, tmp_path / "pt.pth")
    shared = mim.rel_pos_bias.relative_position_bias_table
    for block in classifier.blocks:
        assert torch.equal(block.attn.relative_position_bias_table, shared)
    assert any("copied the shared relative position table" in n for n in notes)
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(classifier.encode(pixels), mim.encode(pixels))


@pytest.mark.parametrize("wrapper", [None, "model", "module"])
def test_unilm_finetuned_checkpoint_loads_strictly_with_the_same_logits(tmp_path, wrapper):
    source = randomized(BeitClassifier(ModelConfig(**TINY)))
    state = unilm_state(source)
    torch.save(state if wrapper is None else {wrapper: state, "args": argparse.Namespace(x=1)}, tmp_path / "ft.pth")
    target = BeitClassifier(ModelConfig(**TINY)).eval()
    notes = load_pretrained(target, tmp_path / "ft.pth")
    assert notes == []
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(source(pixels), target(pixels))


def test_timm_export_has_timm_keys_and_round_trips(tmp_path):
    from safetensors.torch import save_file

    source = randomized(BeitClassifier(ModelConfig(**TINY)))
    exported = to_timm(source.state_dict())
    assert set(exported) == timm_keys(3)
    save_file(exported, tmp_path / "model.safetensors")
    torch.save(exported, tmp_path / "model.pth")
    pixels = torch.randn(2, 3, 48, 48)
    for name in ("model.safetensors", "model.pth"):
        target = BeitClassifier(ModelConfig(**TINY)).eval()
        assert load_pretrained(target, tmp_path / name) == []
        with torch.no_grad():
            assert torch.equal(source(pixels), target(pixels))


def test_pretrained_checkpoint_at_another_resolution_is_resized(tmp_path):
    mim = randomized(BeitForMIM(ModelConfig(**TINY)))
    torch.save({"model": unilm_state(mim)}, tmp_path / "pt.pth")
    bigger = BeitClassifier(ModelConfig(**{**TINY, "image_size": 80})).eval()  # 6x6 -> 10x10 grid
    notes = load_pretrained(bigger, tmp_path / "pt.pth")
    assert any("from a 6x6 to a 10x10 grid" in n for n in notes)
    assert bigger.blocks[0].attn.relative_position_bias_table.shape == (19 * 19 + 3, 4)
    table = bigger.blocks[0].attn.relative_position_bias_table
    assert torch.equal(table[-3:], mim.rel_pos_bias.relative_position_bias_table[-3:])
    centre = table[:-3].view(19, 19, 4)[9, 9]
    assert torch.allclose(centre, mim.rel_pos_bias.relative_position_bias_table[:-3].view(11, 11, 4)[5, 5], atol=1e-6)


def test_resizing_tables_14_to_24_and_back_returns_the_original():
    table = torch.randn(27 * 27 + 3, 12, dtype=torch.float32)
    there = resize_relative_position_table(table, (14, 14), (24, 24))
    assert there.shape == (47 * 47 + 3, 12)
    back = resize_relative_position_table(there, (24, 24), (14, 14))
    assert (back - table).abs().max().item() < 1e-5


def test_growing_matches_the_released_bicubic_spline():
    """The released code called scipy's interp2d(kind='cubic') on geometric-progression
    positions; RectBivariateSpline(kx=3, ky=3, s=0) is scipy's documented successor."""
    from scipy.interpolate import RectBivariateSpline

    from beit.shared.checkpoint import _geometric_positions

    table = torch.randn(27 * 27 + 3, 3, dtype=torch.float64)
    ours = resize_relative_position_table(table, (14, 14), (24, 24))[:-3].view(47, 47, 3)
    x = _geometric_positions(27, 47)
    assert x[13] == 0 and np.all(np.diff(x) >= 1) and abs(x[-1] - 23) < 0.01
    dx = np.arange(-23, 23.1, 1.0)
    for h in range(3):
        z = table[:-3, h].view(27, 27).numpy()
        reference = RectBivariateSpline(x, x, z, kx=3, ky=3, s=0)(dx, dx)
        np.testing.assert_allclose(ours[:, :, h].numpy(), reference, atol=1e-9)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = dict(BeitClassifier(ModelConfig(**TINY)).state_dict())
    del state["blocks.1.mlp.fc1.weight"]
    state["blocks.9.extra"] = torch.zeros(1)
    expected = r"missing keys blocks\.1\.mlp\.fc1\.weight.*unexpected keys blocks\.9\.extra"
    with pytest.raises(CheckpointError, match=expected):
        load_weights(BeitClassifier(ModelConfig(**TINY)), state)


def test_a_checkpoint_for_another_model_size_is_refused(tmp_path):
    torch.save(BeitClassifier(ModelConfig(**{**TINY, "width": 96, "heads": 4})).state_dict(), tmp_path / "w96.pth")
    with pytest.raises(CheckpointError, match="shape mismatches.*same size"):
        load_pretrained(BeitClassifier(ModelConfig(**TINY)), tmp_path / "w96.pth")
    torch.save(BeitClassifier(ModelConfig(**{**TINY, "depth": 4})).state_dict(), tmp_path / "d4.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys blocks\.3\."):
        load_pretrained(BeitClassifier(ModelConfig(**TINY)), tmp_path / "d4.pth")


def test_fine_tuned_weights_cannot_seed_pretraining(tmp_path):
    torch.save(BeitClassifier(ModelConfig(**TINY)).state_dict(), tmp_path / "ft.pth")
    with pytest.raises(CheckpointError, match="relative position table per block"):
        load_pretrained(BeitForMIM(ModelConfig(**TINY)), tmp_path / "ft.pth")


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n", b"\xff\xd8\xff\xe0" + bytes(100)])
def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="is not a beit checkpoint|is not a PyTorch checkpoint"):
        load_checkpoint(path)
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        read_state_dict(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pth")


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, writer):
    marker = tmp_path / "ran"
    payload = {"model": {"w": torch.zeros(2)}, "evil": RunsCode(marker)}
    path = tmp_path / "evil.pth"
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match=r"refused: its pickle would build posix\.system.*nothing in it was run"):
        read_state_dict(path)
    with pytest.raises(CheckpointError):
        load_pretrained(BeitClassifier(ModelConfig(**TINY)), path)
    assert not marker.exists()


def test_adapt_drops_pretraining_only_keys_and_keeps_a_new_head():
    mim = BeitForMIM(ModelConfig(**TINY))
    classifier = BeitClassifier(ModelConfig(**{**TINY, "num_classes": 3}))
    state, notes = adapt_state_dict(mim.state_dict(), classifier)
    assert "lm_head.weight" not in state and "mask_token" not in state
    assert torch.equal(state["head.weight"], classifier.head.weight)
    assert any("dropped" in n and "lm_head.weight" in n for n in notes)


def test_random_states_restore_per_rank_and_from_the_single_state_of_older_checkpoints():
    from beit.shared.dist import Dist

    cpu = torch.device("cpu")
    torch.manual_seed(1)
    saved = Dist().rng_states(cpu)
    expected = torch.rand(3)
    for rng in (saved, saved[0]):  # gathered (one per rank), and one for all
        torch.manual_seed(2)
        Dist().restore_rng(rng, cpu)
        assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(2)
    Dist(rank=1, world=2).restore_rng([saved[0], {"torch": torch.get_rng_state()}], cpu)  # rank 1 takes its own
    assert not torch.equal(torch.rand(3), expected)
