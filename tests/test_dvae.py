"""The dVAE tokenizer: released architecture, conversion of the released pickles, tokenizer files."""

import json
import os
import subprocess
import sys

import pytest
import torch

from beit.shared.checkpoint import CheckpointError
from beit.shared.dvae import DVAE, DVAEConfig, check_grid, convert_dall_e, load_tokenizer, save_tokenizer


def test_released_architecture_sizes():
    model = DVAE(DVAEConfig())
    encoder = sum(p.numel() for p in model.encoder.parameters())
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert round(encoder / 1e5) == 538 and round(decoder / 1e5) == 438
    assert model.cfg.downsample == 8


def released_pickles(tmp_path, n_hid=64, seed=0):
    """Modules of the `dall_e` package with random weights, pickled whole as the release did."""
    from dall_e.decoder import Decoder
    from dall_e.encoder import Encoder

    torch.manual_seed(seed)
    encoder = Encoder(n_hid=n_hid, n_blk_per_group=1, vocab_size=512)
    decoder = Decoder(n_init=32, n_hid=n_hid, n_blk_per_group=1, vocab_size=512)
    with torch.no_grad():
        for p in [*encoder.parameters(), *decoder.parameters()]:
            if p.ndim == 1:
                p.normal_(0, 0.1)  # the release initialises biases at zero: make them count
    torch.save(encoder, tmp_path / "encoder.pkl")
    torch.save(decoder, tmp_path / "decoder.pkl")
    return encoder, decoder


def test_converted_tokenizer_matches_the_dall_e_package(tmp_path):
    from dall_e import map_pixels, unmap_pixels

    encoder, decoder = released_pickles(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "beit",
            "tokenizer",
            "convert",
            tmp_path / "encoder.pkl",
            tmp_path / "decoder.pkl",
            "-o",
            tmp_path / "tok.safetensors",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "vocab 512" in result.stdout
    model = load_tokenizer(tmp_path / "tok.safetensors")
    pixels = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        logits = encoder(map_pixels(pixels))
        tokens = model.tokenize(pixels)
        assert torch.equal(tokens, logits.argmax(1))
        assert len(tokens.unique()) > 5  # a real comparison, not of one constant token
        one_hot = torch.nn.functional.one_hot(tokens, 512).permute(0, 3, 1, 2).float()
        theirs = unmap_pixels(torch.sigmoid(decoder(one_hot)[:, :3]))
        assert (model.reconstruct(tokens) - theirs).abs().max().item() < 1e-4


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    encoder, _ = released_pickles(tmp_path)
    encoder.evil = RunsCode(tmp_path / "ran")  # hidden inside an otherwise genuine module
    torch.save(encoder, tmp_path / "evil.pkl")
    with pytest.raises(CheckpointError, match=r"would build posix\.system.*nothing in it was run"):
        convert_dall_e(tmp_path / "evil.pkl")
    assert not (tmp_path / "ran").exists()


def test_bad_inputs_are_one_clear_error_each(tmp_path):
    released_pickles(tmp_path)
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    with pytest.raises(ValueError, match="is not a pickled DALL-E dVAE module"):
        convert_dall_e(tmp_path / "photo.jpg")
    with pytest.raises(ValueError, match="does not exist"):
        convert_dall_e(tmp_path / "encoder.pkl", tmp_path / "no-decoder.pkl")
    with pytest.raises(ValueError, match="not the Encoder"):
        convert_dall_e(tmp_path / "decoder.pkl")
    other = tmp_path / "other"
    other.mkdir()
    released_pickles(other, n_hid=128)
    with pytest.raises(ValueError, match="does not belong to"):
        convert_dall_e(tmp_path / "encoder.pkl", other / "decoder.pkl")
    with pytest.raises(ValueError, match="not a multiple of the tokenizer's downsampling 8"):
        check_grid(100, DVAEConfig())
    assert check_grid(112, DVAEConfig()) == 14
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_tokenizer(tmp_path / "photo.jpg")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="has no beit tokenizer metadata"):
        load_tokenizer(tmp_path / "plain.safetensors")


def test_encoder_only_tokenizer_round_trips_and_refuses_to_reconstruct(tmp_path):
    model = DVAE(DVAEConfig(n_hid=16, blocks_per_group=1, vocab_size=64, n_init=8), with_decoder=False)
    info = save_tokenizer(model, tmp_path / "enc.safetensors")
    assert info["decoder_parameters"] == 0 and len(info["sha256"]) == 64
    back = load_tokenizer(tmp_path / "enc.safetensors")
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.equal(back.tokenize(pixels), model.eval().tokenize(pixels))
    with pytest.raises(ValueError, match="has no decoder"):
        back.reconstruct(torch.zeros(1, 4, 4, dtype=torch.long))


def test_the_tokenizer_identity_is_its_encoder(tmp_path):
    from beit.shared.dvae import encoder_sha256

    torch.manual_seed(1)
    model = DVAE(DVAEConfig(n_hid=16, blocks_per_group=1, vocab_size=64, n_init=8))
    a = save_tokenizer(model, tmp_path / "a.safetensors", input_size=32)
    encoder_only = DVAE(model.cfg, with_decoder=False)
    encoder_only.encoder.load_state_dict(model.encoder.state_dict())
    b = save_tokenizer(encoder_only.to(memory_format=torch.channels_last), tmp_path / "b.safetensors", input_size=64)
    assert a["sha256"] != b["sha256"] and a["encoder_sha256"] == b["encoder_sha256"]
    other = DVAE(model.cfg)
    assert encoder_sha256(other) != a["encoder_sha256"]


def test_damaged_tokenizer_files_are_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    model = DVAE(DVAEConfig(n_hid=16, blocks_per_group=1, vocab_size=64, n_init=8))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    arch = {"n_hid": 16, "blocks_per_group": 1, "group_count": 4, "vocab_size": 128, "n_init": 8}
    save_file(state, tmp_path / "wrong.safetensors", metadata={"beit_tokenizer": json.dumps(arch)})
    with pytest.raises(ValueError, match=r"wrong.safetensors is damaged.*do not fit its recorded architecture"):
        load_tokenizer(tmp_path / "wrong.safetensors")
    save_file(state, tmp_path / "junk.safetensors", metadata={"beit_tokenizer": "{not json"})
    with pytest.raises(ValueError, match=r"junk.safetensors is damaged.*its metadata"):
        load_tokenizer(tmp_path / "junk.safetensors")
