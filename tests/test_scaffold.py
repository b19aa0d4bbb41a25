"""The run scaffold every trainer uses: a resumed run gets its weights, optimizer and metrics
back; a checkpoint of another run is refused, naming what differs."""

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from beit.shared.checkpoint import CheckpointError
from beit.train.scaffold import RUN_SETTINGS, Run, changed_keys, lr_at, set_lr


@dataclass
class TinyConfig:
    FREE_ON_RESUME: ClassVar[tuple[str, ...]] = RUN_SETTINGS
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    log_every: int = 1
    checkpoint_every: int = 1
    threads: int = 1
    device: str = "cpu"
    dist_timeout_minutes: float = 1.0


def build(cfg: TinyConfig, out, classes=("a", "b")):
    run = Run(out, cfg, "tiny", progress=False)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    run.identity(classes=list(classes))
    return run, model, optimizer


def test_a_run_resumes_its_weights_optimizer_and_metrics(tmp_path):
    run, model, optimizer = build(TinyConfig(), tmp_path)
    assert run.resume(True, model, optimizer, total=10) is None and run.wrap(model) is model
    run.start(0)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    for step in (1, 2, 3):
        run.log({"step": step, "loss": 1.0 / step})
    run.save(run.checkpoint, model, optimizer, run.dist.rng_states(run.device), {"step": 2})
    assert (tmp_path / "config.toml").read_text().count("lr = 0.1") == 1

    # threads and log_every are free on resume; the rows past the checkpoint's step are dropped
    resumed, fresh_model, fresh_optimizer = build(TinyConfig(threads=2, log_every=5), tmp_path)
    meta = resumed.resume(True, fresh_model, fresh_optimizer, total=10)
    assert meta["step"] == 2 and meta["kind"] == "tiny" and meta["classes"] == ["a", "b"]
    torch.testing.assert_close(fresh_model.weight, model.weight, rtol=0, atol=0)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1
    resumed.start(meta["step"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    # --no-resume starts over
    assert build(TinyConfig(), tmp_path)[0].resume(False, fresh_model, fresh_optimizer, total=10) is None


@pytest.mark.parametrize(
    ("cfg", "classes", "named"),
    [
        (TinyConfig(lr=0.2), ("a", "b"), "config.lr"),
        (TinyConfig(betas=(0.8, 0.999)), ("a", "b"), "config.betas"),
        (TinyConfig(), ("a", "c"), "classes"),
    ],
)
def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path, cfg, classes, named):
    run, model, optimizer = build(TinyConfig(), tmp_path)
    run.save(run.checkpoint, model, optimizer, run.dist.rng_states(run.device), {"step": 1})
    other, model, optimizer = build(cfg, tmp_path, classes)
    with pytest.raises(CheckpointError, match=rf"is from another run \({named} differ\).*--no-resume"):
        other.resume(True, model, optimizer, total=10)


def test_lr_schedule_and_layer_scales():
    assert lr_at(0, 1.0, 0.0, 10, 100) == 0.0 and lr_at(5, 1.0, 0.0, 10, 100) == 0.5
    assert lr_at(10, 1.0, 0.1, 10, 100) == 1.0 and lr_at(100, 1.0, 0.1, 10, 100) == pytest.approx(0.1)
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([{"params": [a], "lr_scale": 0.5}, {"params": [b]}], lr=1.0)
    set_lr(optimizer, 0.2)
    assert [group["lr"] for group in optimizer.param_groups] == [0.1, 0.2]
    assert changed_keys({"a": {"b": (1, 2)}, "c": 1}, {"a": {"b": [1, 2]}, "c": 2, "d": 0}) == ["c", "d"]
