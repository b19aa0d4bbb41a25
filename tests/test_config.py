import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from beit.shared.config import ConfigError, load_config, to_toml
from beit.train.model import ModelConfig


@dataclass
class Optim:
    lr: float = 1.5e-3
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class Run:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: Optim = field(default_factory=Optim)
    epochs: int = 800
    out: Path = Path("runs/x")
    compile: bool = False
    resume_from: str | None = None
    init: Path | None = Path("default.pt")
    name: str = "run"


def test_file_then_overrides(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('epochs = 10\n[model]\npreset = "tiny"\ndepth = 6\n[optim]\nlr = 1e-3\n')
    cfg = load_config(
        Run, config, ["model.depth=4", "optim.betas=[0.9, 0.98]", "compile=true", "out=runs/y", "optim.lr=2"]
    )
    assert cfg.epochs == 10 and cfg.model.preset == "tiny" and cfg.model.depth == 4
    assert cfg.optim.betas == (0.9, 0.98) and cfg.compile is True and cfg.out == Path("runs/y")
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.width == 0  # the preset fills it when the model is built, not in the config


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(Run, None, ["model.preset=small", "optim.schedule=constant", "resume_from=abc", "init=none"])
    assert cfg.init is None
    (tmp_path / "saved.toml").write_text(to_toml(cfg))
    assert load_config(Run, tmp_path / "saved.toml") == cfg


def test_text_fields_take_text_that_looks_like_numbers():
    cfg = load_config(Run, None, ["name=2024", "out=123", "resume_from=7"])
    assert cfg.name == "2024" and cfg.out == Path("123") and cfg.resume_from == "7"


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.dept=3", "unknown config key model.dept"),
        ("epoch=3", "unknown config key epoch"),
        ("model.depth=three", "config key model.depth: expected int, got str 'three'"),
        ("epochs=1.5", "config key epochs: expected int, got float 1.5"),
        ("compile=1", "config key compile: expected bool, got int 1"),
        ("optim.schedule=linear", "config key optim.schedule: 'linear' is not one of 'cosine', 'constant'"),
        ("optim.betas=[0.9]", "config key optim.betas: expected 2 values, got 1"),
        ("optim=3", "config key optim: expected a table"),
        ("depth", "is not of the form key=value"),
    ],
)
def test_bad_keys_and_types_are_one_clear_error(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(Run, None, [override])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("epochs = = 3")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(Run, tmp_path / "bad.toml")
    (tmp_path / "typo.toml").write_text("[optim]\nlearning_rate = 3e-4\n")
    with pytest.raises(ConfigError, match="unknown config key optim.learning_rate"):
        load_config(Run, tmp_path / "typo.toml")


def test_a_table_refines_the_fields_own_default():
    @dataclass
    class Outer:
        model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="tiny", image_size=0))

    cfg = load_config(Outer, None, ["model.depth=2"])
    assert (cfg.model.preset, cfg.model.image_size, cfg.model.depth) == ("tiny", 0, 2)


@pytest.mark.parametrize(
    "cls,override",
    [
        ("beit.train.pretrain.trainer.PretrainConfig", "checkpoint_every=0"),
        ("beit.train.pretrain.trainer.PretrainConfig", "accumulation=0"),
        ("beit.train.classify.finetune.FinetuneConfig", "eval_every=0"),
        ("beit.train.classify.finetune.FinetuneConfig", "log_every=-5"),
        ("beit.train.tokenizer.trainer.DVAETrainConfig", "steps=0"),
        ("beit.tokenize.stage1.TokenizeConfig", "views=0"),
    ],
)
def test_counts_and_intervals_below_one_are_refused_on_load(cls, override):
    module, name = cls.rsplit(".", 1)
    config = getattr(importlib.import_module(module), name)
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=f"config key {key}: {value} is below 1: set it to 1 or more."):
        load_config(config, None, [override])
    load_config(config, None, [f"{key}=1"])
