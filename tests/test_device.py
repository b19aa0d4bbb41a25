"""`--set device=...` means the same thing in every command (`beit.shared.dist.choose_device`)."""

import pytest
import torch
from photos import beit

from beit.shared.dist import choose_device


def test_device_settings():
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device("auto", 3) == (torch.device("cuda", 3) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(ValueError, match=r"device 'gpu' is not a device: use auto, cpu, cuda or cuda:N\."):
        choose_device("gpu")
    if torch.cuda.is_available():
        assert choose_device("cuda", 1) == torch.device("cuda", 1)  # no index: this rank's GPU
        assert choose_device("cuda:0", 1) == torch.device("cuda", 0)
    else:
        with pytest.raises(ValueError, match=r"device 'cuda' needs a CUDA GPU, and torch sees none"):
            choose_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a CPU-only machine gives")
def test_a_command_asked_for_a_missing_gpu_says_so(tmp_path):
    result = beit("pretrain", tmp_path / "no-store", "--out", tmp_path / "run", "--set", "device=cuda")
    assert result.returncode == 1
    assert "needs a CUDA GPU, and torch sees none: use --set device=cpu (or auto)." in result.stderr
