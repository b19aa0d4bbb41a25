"""GPU checks (skipped without CUDA): the model's bf16 step runs through SDPA and agrees with fp32."""

import numpy as np
import pytest
import torch

from beit.shared.masking import block_mask
from beit.shared.model import BeitForMIM, ModelConfig, mim_loss

pytestmark = pytest.mark.gpu


def test_bf16_mim_step_on_cuda_matches_fp32():
    torch.manual_seed(0)
    model = BeitForMIM(ModelConfig(preset="small", drop_path=0.0)).cuda()
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(np.stack([block_mask(rng).reshape(-1) for _ in range(8)])).cuda()
    pixels = torch.randn(8, 3, 224, 224, device="cuda")
    targets = torch.randint(0, 8192, (8, 196), device="cuda")
    with torch.no_grad():
        reference = mim_loss(model(pixels, mask), targets, mask)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = mim_loss(model(pixels, mask), targets, mask)
    loss.backward()
    assert abs(loss.item() - reference.item()) < 0.02 * reference.item()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_dvae_low_precision_tokens_agree_with_fp32_on_cuda():
    """The released architecture on real photo crops: fp16 (as released) and bf16 argmax
    against fp32, channels-last. Random weights have smaller logit margins than trained ones,
    so this is the harder case."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from dvae import photo_batch

    from beit.shared.dvae import DVAE, DVAEConfig

    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = False  # an fp32 reference, not TF32
    model = DVAE(DVAEConfig(), with_decoder=False).eval().cuda()
    pixels = photo_batch(64, 112).cuda()
    reference = model.tokenize(pixels)
    assert (model.tokenize(pixels, dtype=torch.float16) == reference).float().mean() >= 0.99
    assert (model.tokenize(pixels, dtype=torch.bfloat16) == reference).float().mean() >= 0.98
    # what `beit tokenize` runs by default (fp16 body, TF32 logits) against strict fp32
    from beit.shared.dvae import Precision
    from beit.tokenize.run import TokenizeConfig

    command = Precision.resolve(TokenizeConfig.precision, TokenizeConfig.tf32, pixels.device)
    assert command.tf32 and command.body == "fp16"
    assert (command.tokenize(model, pixels) == reference).float().mean() >= 0.99
