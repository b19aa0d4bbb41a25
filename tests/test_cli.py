import subprocess
import sys


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
