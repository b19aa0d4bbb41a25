"""The dVAE tokenizer: released architecture, conversion of the released pickles, tokenizer files."""

import collections
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from helpers import beit_here

from beit.shared.checkpoint import CheckpointError
from beit.shared.dalle import convert_dall_e
from beit.shared.dvae import DVAE, DVAEConfig, check_grid, load_tokenizer, save_tokenizer


def test_released_architecture_sizes():
    model = DVAE(DVAEConfig())
    encoder = sum(p.numel() for p in model.encoder.parameters())
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert round(encoder / 1e5) == 538 and round(decoder / 1e5) == 438
    assert model.cfg.downsample == 8


RELEASED = {"n_hid": 256, "n_blk_per_group": 2, "vocab_size": 8192, "n_init": 128}  # the released sizes
SMALL = {"n_hid": 64, "n_blk_per_group": 1, "vocab_size": 512, "n_init": 32}


def released_pickles(tmp_path, n_hid=64, seed=0, legacy=True, size=None):
    """Modules of the `dall_e` package with random weights, pickled whole as the release did:
    in PyTorch's legacy format (as OpenAI's files are), or in its zip format."""
    from dall_e.decoder import Decoder
    from dall_e.encoder import Encoder

    size = size or {**SMALL, "n_hid": n_hid}
    torch.manual_seed(seed)
    encoder = Encoder(n_hid=size["n_hid"], n_blk_per_group=size["n_blk_per_group"], vocab_size=size["vocab_size"])
    decoder = Decoder(
        n_init=size["n_init"],
        n_hid=size["n_hid"],
        n_blk_per_group=size["n_blk_per_group"],
        vocab_size=size["vocab_size"],
    )
    with torch.no_grad():
        for p in [*encoder.parameters(), *decoder.parameters()]:
            if p.ndim == 1:
                p.normal_(0, 0.1)  # the release initialises biases at zero: make them count
    save(encoder, tmp_path / "encoder.pkl", legacy)
    save(decoder, tmp_path / "decoder.pkl", legacy)
    return encoder, decoder


def save(module, path, legacy=True):
    torch.save(module, path, _use_new_zipfile_serialization=not legacy)


def convert(tmp_path):
    files = (tmp_path / "encoder.pkl", tmp_path / "decoder.pkl")
    return beit_here("tokenizer", "convert", *files, "-o", tmp_path / "tok.safetensors")


# OpenAI's files are in PyTorch's legacy format: the released size in that format, and both
# formats at a small size (the format is read the same way whatever the size)
@pytest.mark.parametrize(
    ("legacy", "size"),
    [(True, "released"), (True, "small"), (False, "small")],
    ids=["released-legacy-format", "small-legacy-format", "small-zip-format"],
)
def test_converted_tokenizer_matches_the_dall_e_package(tmp_path, legacy, size):
    from dall_e import map_pixels, unmap_pixels

    encoder, decoder = released_pickles(tmp_path, legacy=legacy, size=RELEASED if size == "released" else SMALL)
    with open(tmp_path / "encoder.pkl", "rb") as f:
        assert (f.read(4) == b"PK\x03\x04") != legacy  # the format asked for
    result = convert(tmp_path)
    assert result.returncode == 0, result.stderr
    vocab = 8192 if size == "released" else 512
    assert f"vocab {vocab}" in result.stdout
    if size == "released":
        assert "encoder 53.8M parameters, decoder 43.8M" in result.stdout
    model = load_tokenizer(tmp_path / "tok.safetensors")
    # its own generator: the draw does not depend on what the conversion drew from torch's global one
    pixels = torch.rand(1 if size == "released" else 2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = encoder(map_pixels(pixels))
        tokens = model.tokenize(pixels)
        assert torch.equal(tokens, logits.argmax(1))
        # a real comparison, not of one constant token: 6 distinct tokens in each case (AMD EPYC,
        # 2026-12-02); random weights make a few codes win everywhere, so ask for 3
        assert len(tokens.unique()) >= 3
        one_hot = torch.nn.functional.one_hot(tokens, vocab).permute(0, 3, 1, 2).float()
        theirs = unmap_pixels(torch.sigmoid(decoder(one_hot)[:, :3]))
        assert (model.reconstruct(tokens) - theirs).abs().max().item() < 1e-4


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy-format", "zip-format"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, legacy):
    encoder, _ = released_pickles(tmp_path, legacy=legacy)
    encoder.evil = RunsCode(tmp_path / "ran")  # hidden inside an otherwise genuine module
    save(encoder, tmp_path / "evil.pkl", legacy)
    with pytest.raises(CheckpointError, match=r"would build posix\.system.*nothing in it was run"):
        convert_dall_e(tmp_path / "evil.pkl")
    assert not (tmp_path / "ran").exists()
    with pytest.raises(CheckpointError, match=r"^\S+evil.pkl was refused: [^\n]*\.$"):  # one sentence
        convert_dall_e(tmp_path / "evil.pkl")


@pytest.mark.parametrize(
    "source",
    [
        "import os\nos.system('touch {marker}')\nclass Encoder(nn.Module):\n    pass\n",
        "class Encoder(nn.Module):\n    __import__('os').system('touch {marker}')\n",
        "class Encoder(nn.Module):\n    n_hid: int = __import__('os').system('touch {marker}')\n    def f(self): pass\n"
        "    __import__('os').system('touch {marker}')\n",
    ],
    ids=["module-level", "class-body", "after-a-method"],
)
def test_a_module_record_whose_source_would_run_code_is_refused(tmp_path, monkeypatch, source):
    from dall_e.encoder import Encoder

    marker = tmp_path / "ran"
    text = source.format(marker=marker)
    proof = tmp_path / "proof"  # the payload is live: executed, it does run
    subprocess.run(
        [sys.executable, "-c", "import torch.nn as nn\n" + text.replace(str(marker), str(proof))], check=True
    )
    assert proof.exists()

    import torch.serialization as serialization

    real = serialization.get_source_lines_and_file
    monkeypatch.setattr(
        serialization,
        "get_source_lines_and_file",
        lambda obj, *a: ([text], 0, "encoder.py") if obj is Encoder else real(obj, *a),
    )
    released_pickles(tmp_path)  # the encoder's module record now carries the payload as its source
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"module record for Encoder carries source text .*nothing in it was run"):
        convert_dall_e(tmp_path / "encoder.pkl")
    assert not marker.exists()


def test_a_global_outside_the_allow_list_is_refused(tmp_path):
    encoder, _ = released_pickles(tmp_path)
    encoder.extra = torch.nn.Linear(2, 2)  # a torch class, harmless, but no part of the dVAE
    save(encoder, tmp_path / "extra.pkl")
    with pytest.raises(CheckpointError, match=r"would build torch\.nn\.modules\.linear\.Linear.*nothing in it was run"):
        convert_dall_e(tmp_path / "extra.pkl")


class _Record:
    """Pickles as a persistent id of a hand-written legacy file."""

    def __init__(self, record):
        self.record = record


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


def write_legacy(path, obj, storages):
    """A legacy-format file written by hand (as `torch.serialization._legacy_save` lays it
    out), so that its records can say what a genuine writer never would. `storages` maps a
    key to (the element count its data section declares, the float32 values written)."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            return o.record if isinstance(o, _Record) else None

    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(obj)
        pickle.dump(sorted(storages), f, protocol=2)
        for key in sorted(storages):
            declared, values = storages[key]
            f.write(struct.pack("<q", declared) + np.asarray(values, dtype=np.float32).tobytes())


def test_storage_records_that_run_past_the_file_are_refused(tmp_path):
    from dall_e.encoder import Encoder

    def conv(numel, offset=0, declared=None, written=None):
        storage = _Record(("storage", torch.FloatStorage, "0", "cpu", numel, None))
        weights = {"w": _Tensor(storage, offset, (2, 2), (2, 1))}
        module = Encoder.__new__(Encoder)  # attributes only: pickled as the release pickles modules
        module.__dict__.update(_parameters=weights, _modules={})
        values = [0.5] * numel if written is None else written
        write_legacy(tmp_path / "forged.pkl", module, {"0": (declared or numel, values)})
        return tmp_path / "forged.pkl"

    assert convert_dall_e_state(conv(4))["weight"].tolist() == [[0.5, 0.5], [0.5, 0.5]]  # the forger is sound
    with pytest.raises(
        ValueError, match=r"forged.pkl is damaged \(storage 0 declares 4000000000000 bytes but only 16 remain"
    ):
        convert_dall_e(conv(10**12, written=[0.5] * 4))
    with pytest.raises(ValueError, match=r"is damaged \(a tensor of shape \[2, 2\] at offset 3 runs past storage 0"):
        convert_dall_e(conv(4, offset=3))
    with pytest.raises(ValueError, match=r"is damaged \(storage 0 holds 5 elements where its record declares 4"):
        convert_dall_e(conv(4, declared=5, written=[0.5] * 5))


def convert_dall_e_state(path):
    from beit.shared.dalle import _recorded_weights, _stand_ins
    from beit.shared.safe_pickle import load_legacy

    return _recorded_weights(load_legacy(path, {name: cls for cls, name in _stand_ins()}))


def test_truncated_empty_and_foreign_files_are_one_clear_error_each(tmp_path):
    released_pickles(tmp_path)
    data = (tmp_path / "encoder.pkl").read_bytes()
    pickled = data.index(b"collections")  # well inside the object pickle
    for name, cut, match in [
        ("in-the-pickle.pkl", pickled, r"is damaged \(it ends inside its pickles \(truncated\)\)"),
        ("in-the-storages.pkl", len(data) - 1000, r"is damaged \(storage \d+ declares \d+ bytes but only \d+ remain"),
    ]:
        (tmp_path / name).write_bytes(data[:cut])
        with pytest.raises(ValueError, match=match):
            convert_dall_e(tmp_path / name)
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pkl is empty: download"):
        convert_dall_e(tmp_path / "empty.pkl")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "state.pt")  # a zip-format file, not a dVAE
    with pytest.raises(ValueError, match=r"state.pt is not a pickled DALL-E dVAE module \(it holds a dict\)"):
        convert_dall_e(tmp_path / "state.pt")
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as archive:
        archive.writestr("a.txt", "hello")
    with pytest.raises(ValueError, match=r"photos.zip is not a pickled DALL-E dVAE module"):
        convert_dall_e(tmp_path / "photos.zip")


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
