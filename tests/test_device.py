"""`--set device=...` means the same thing in every command (`beit.shared.dist.choose_device`)."""

import pytest
import torch
from helpers import beit_here

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
    result = beit_here("pretrain", tmp_path / "no-store", "--out", tmp_path / "run", "--set", "device=cuda")
    assert result.returncode == 1
    assert "needs a CUDA GPU, and torch sees none: use --set device=cpu (or auto)." in result.stderr


def test_dali_threads_share_the_cores_among_the_local_ranks(monkeypatch):
    """threads 0 (every command's default) gives each of torchrun's local ranks its share of the
    cores this process may run on; a positive setting is taken as written."""
    import os

    from beit.shared.decode import dali_threads

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert dali_threads(0) == cores and dali_threads(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert dali_threads(0) == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))
    assert dali_threads(0) == 1


def test_the_tokenizer_precision_policy():
    """One policy for the command, online targets, verify, the benchmark and the GPU test."""
    from beit.shared.dvae import DVAE, DVAEConfig, Precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert Precision.resolve("auto", True, cpu) == Precision("fp32", False)  # TF32 means nothing on a CPU
    assert Precision.resolve("auto", True, cuda) == Precision("fp16", True)
    assert Precision.resolve("bf16", False, cuda).dtype is torch.bfloat16
    with pytest.raises(ValueError, match="precision 'int8' is not one of auto, fp32, fp16, bf16"):
        Precision.resolve("int8", False, cpu)
    # a store's recorded policy holds on the kind of device it was made on, else that device's default
    assert Precision.recorded({"body": "fp16", "tf32": True, "device": "cuda"}, cuda) == Precision("fp16", True)
    assert Precision.recorded({"body": "fp16", "tf32": True, "device": "cuda"}, cpu) == Precision("fp32", False)
    assert Precision.recorded(None, cuda) == Precision("fp16", False)
    torch.manual_seed(0)
    model = DVAE(DVAEConfig(n_hid=16, vocab_size=64), with_decoder=False).eval()
    pixels = torch.rand(2, 3, 32, 32)
    before = torch.backends.cudnn.allow_tf32
    assert torch.equal(Precision("fp32", False).tokenize(model, pixels), model.tokenize(pixels))
    assert torch.backends.cudnn.allow_tf32 == before  # the policy does not leak into other work
