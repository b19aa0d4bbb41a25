import subprocess
import sys

from helpers import beit_here


def run(*args):
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_help_lists_the_stages():
    beit = __import__("shutil").which("beit") or str(__import__("pathlib").Path(sys.executable).parent / "beit")
    for command in ([beit, "--help"], [sys.executable, "-m", "beit", "--help"]):
        result = run(*command)
        assert result.returncode == 0, result.stderr
        for name in ("tokenize", "pretrain", "finetune"):
            assert name in result.stdout
        assert "Stage 1" in result.stdout and "Stage 2" in result.stdout


def test_explicit_options_are_config_keys_and_win_over_set():
    # --set alone: its value is checked as the config key
    result = beit_here("finetune", "/nowhere", "--init", "none", "--out", "/nowhere/run", "--set", "epochs=0")
    assert result.returncode == 1 and "config key epochs: 0 is below 1" in result.stderr
    # the explicit option is the same key and comes after --set: the run gets as far as its data
    args = ["--init", "none", "--out", "/nowhere/run", "--set", "epochs=0", "--epochs", "2"]
    result = beit_here("finetune", "/nowhere", *args)
    assert result.returncode == 1 and "/nowhere does not exist" in result.stderr
    result = beit_here("tokenize", "/nowhere", "/nowhere/store", "--tokenizer", "/nowhere/t", "--views", "0")
    assert result.returncode == 1 and "config key views: 0 is below 1" in result.stderr
