"""Converting the released DALL-E dVAE (`encoder.pkl`, `decoder.pkl`, openai/DALL-E) into this
project's tokenizer (`beit.shared.dvae.DVAE`), safely: the pickles are read through allow-lists
(`beit.shared.safe_pickle`), as records of their modules and tensors; nothing in them runs.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from beit.shared.dvae import DVAE, DVAEConfig

_MODULE_CLASSES = [
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder",
    "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.linear.Identity",
    "torch.nn.modules.upsampling.Upsample",
]


class _Recorded:
    """Stands in for a pickled module: keeps its attributes, runs nothing."""


def _stand_ins() -> list[tuple[type, str]]:
    return [(type(name.rsplit(".", 1)[1], (_Recorded,), {}), name) for name in _MODULE_CLASSES]


def _read_module_pickle(path: Path) -> _Recorded:
    """Read a whole-module pickle from the DALL-E release, in PyTorch's zip or legacy format,
    with the known class names bound to inert stand-ins: any other global (code that would run)
    is refused before anything is built, and no source text recorded in the file is run."""
    from beit.shared.checkpoint import CheckpointError
    from beit.shared.safe_pickle import DamagedFile, RefusedPickle, file_format, load_legacy, unsafe_globals

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: pass the released encoder.pkl / decoder.pkl.")
    stand_ins = _stand_ins()
    kind = file_format(path)
    if kind == "empty":
        raise ValueError(f"{path} is empty: download the released encoder.pkl / decoder.pkl again.")
    if kind == "other":
        raise ValueError(f"{path} is not a pickled DALL-E dVAE module (not a PyTorch file in either format).")
    if kind == "legacy":
        try:
            obj = load_legacy(path, {name: cls for cls, name in stand_ins})
        except RefusedPickle as error:
            raise CheckpointError(
                f"{path} was refused: {error}, which is not part of the DALL-E dVAE, and nothing in it was run."
            ) from None
        except DamagedFile as error:
            raise ValueError(
                f"{path} is damaged ({error}): download the released encoder.pkl / decoder.pkl again."
            ) from None
    else:
        try:
            with torch.serialization.safe_globals(stand_ins):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            known = {name for _, name in stand_ins}
            unsafe = [n for n in unsafe_globals(path, []) if n not in known]
            if unsafe:
                raise CheckpointError(
                    f"{path} was refused: its pickle would build {', '.join(unsafe)}, which is not part of "
                    "the DALL-E dVAE, and nothing in it was run."
                ) from None
            raise ValueError(f"{path} is not a pickled DALL-E dVAE module ({str(error).splitlines()[0]}).") from None
    if not isinstance(obj, _Recorded):
        raise ValueError(f"{path} is not a pickled DALL-E dVAE module (it holds a {type(obj).__name__}).")
    return obj


def _recorded_weights(module: _Recorded, prefix: str = "") -> dict[str, torch.Tensor]:
    state = {}
    for name, value in (module.__dict__.get("_parameters") or {}).items():
        if value is not None:
            state[prefix + {"w": "weight", "b": "bias"}.get(name, name)] = value.detach().float().contiguous()
    for name, child in (module.__dict__.get("_modules") or {}).items():
        if isinstance(child, _Recorded):
            state.update(_recorded_weights(child, f"{prefix}{name}."))
    return state


def _group_count(module: _Recorded) -> int:
    """`group_count` is a class constant in the release, not pickled: count the groups."""
    blocks = module.__dict__["_modules"]["blocks"].__dict__["_modules"]
    return sum(name.startswith("group_") for name in blocks)


def convert_dall_e(encoder_path: Path, decoder_path: Path | None = None) -> DVAE:
    """Build this project's DVAE from the released `encoder.pkl` (and `decoder.pkl`)."""
    encoder = _read_module_pickle(encoder_path)
    if type(encoder).__name__ != "Encoder":
        raise ValueError(
            f"{encoder_path} holds a DALL-E {type(encoder).__name__}, not the Encoder: check the order "
            "of the files (encoder first)."
        )
    e = encoder.__dict__
    cfg = DVAEConfig(
        n_hid=e["n_hid"],
        blocks_per_group=e["n_blk_per_group"],
        group_count=_group_count(encoder),
        vocab_size=e["vocab_size"],
    )
    if e.get("input_channels", 3) != 3:
        raise ValueError(f"{encoder_path}: the encoder takes {e['input_channels']} channels; beit needs RGB (3).")
    states = {"encoder": _recorded_weights(encoder)}
    if decoder_path is not None:
        decoder = _read_module_pickle(decoder_path)
        if type(decoder).__name__ != "Decoder":
            raise ValueError(f"{decoder_path} holds a DALL-E {type(decoder).__name__}, not the Decoder.")
        d = decoder.__dict__
        theirs = (d["n_hid"], d["n_blk_per_group"], _group_count(decoder), d["vocab_size"])
        ours = (cfg.n_hid, cfg.blocks_per_group, cfg.group_count, cfg.vocab_size)
        if theirs != ours:
            raise ValueError(
                f"{decoder_path} does not belong to {encoder_path}: decoder (n_hid, blocks, groups, vocab) "
                f"= {theirs}, encoder = {ours}."
            )
        cfg = DVAEConfig(**{**asdict(cfg), "n_init": d["n_init"]})
        states["decoder"] = _recorded_weights(decoder)
    model = DVAE(cfg, with_decoder=decoder_path is not None)
    for part, state in states.items():
        target = getattr(model, part)
        missing, unexpected = target.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"the released {part} does not have the DALL-E layout: missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}."
            )
    return model.eval()
