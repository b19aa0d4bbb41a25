"""The GPU window's plan and its pieces that run here (bench/gpu/GPU.md): the calls fit the budget,
the requirement check finds what is missing, the results a cut step leaves are collected whole,
and what would not come back from $OUT is named. (`make gpu-rehearsal` runs the calls themselves.)"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

import rehearse as gpu_rehearse  # noqa: E402
import summary as gpu_summary  # noqa: E402
import wheels as gpu_wheels  # noqa: E402


def test_the_calls_fit_twelve_minutes_and_each_calls_steps_fit_its_limit():
    calls = gpu_rehearse.read_calls()
    assert len(calls) == 3 and all(c["carry"] for c in calls)
    assert gpu_rehearse.START_S + sum(c["timeout_s"] for c in calls) <= 720
    errors = []
    for number, call in enumerate(calls, 1):
        gpu_rehearse.plan(call, errors, number)
    assert not errors
    steps = [c.get("steps", {}) for c in calls]
    assert steps[0] and not steps[1] and steps[2]  # call 2 only copies a part
    for call, listed in zip(calls, steps, strict=True):
        assert not listed or sum(listed.values()) + gpu_rehearse.MARGIN_S <= call["timeout_s"]
    assert "install" in steps[2] and list(steps[2])[0] == "install"  # DALI and zarr before anything needs them


def dist_info(folder: Path, name: str, version: str, requires: list[str]) -> None:
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = [f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
    (info / "METADATA").write_text("Metadata-Version: 2.1\n" + "\n".join(lines) + "\n")


def test_the_check_names_each_unmet_requirement_of_a_carried_wheel(tmp_path, capsys):
    requires = ["numpy>=1", "helper>=2", "absent-package", 'winonly; sys_platform == "win32"']
    dist_info(tmp_path, "carried", "1.0", requires)
    dist_info(tmp_path, "helper", "1.5", [])
    assert gpu_wheels.check(tmp_path) == 2
    out = capsys.readouterr().out
    assert "requires helper>=2 (found 1.5)" in out and "requires absent-package (not installed)" in out
    assert "winonly" not in out and "numpy" not in out


def test_the_check_passes_what_is_met_and_says_what_was_left_out_on_purpose(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_wheels, "LEFT_OUT", {"no-such-package-here": "not used"})
    dist_info(tmp_path, "carried", "1.0", ["numpy>=1", "helper>=1", "no-such-package-here==1.0"])
    dist_info(tmp_path, "helper", "1.5", [])
    assert gpu_wheels.check(tmp_path) == 0
    assert "left out: no-such-package-here==1.0 (not used)" in capsys.readouterr().out


def test_a_cut_step_leaves_whole_results_and_a_table(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    row = {"model": "base", "implementation": "beit (ours)", "compiled": False, "batch": 256, "images_per_s": 2000.0}
    (work / "train_step.json").write_text(json.dumps({"results": [{**row, "mfu": 0.45}]}))
    (work / "dvae.json").write_text('{"results": {"fp32 (refer')  # cut while being written
    (out / "steps.txt").write_text("train_step: rc 124 in 115 s (limit 115 s), cut at its limit\n")
    sys.argv = ["gpu_summary.py", "collect", str(work), str(out)]
    gpu_summary.main()
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "steps.txt", "summary.txt"]
    assert list(json.loads((out / "results.json").read_text())) == ["train_step.json"]
    table = (out / "summary.txt").read_text()
    assert "cut at its limit" in table and "45.0% MFU, 2000 img/s" in table
    assert gpu_summary.load_results(out) == gpu_summary.load_results(work)  # what came back reads the same


def test_what_would_not_come_back_from_out_is_named(tmp_path):
    for i in range(9):
        (tmp_path / f"{i}.txt").write_text("x")
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_text("x")
    problems = gpu_rehearse.check_out(tmp_path)
    assert any("10 files" in p for p in problems) and any("deep.txt is more than 2 folders" in p for p in problems)
    assert not gpu_rehearse.check_out(deep)
