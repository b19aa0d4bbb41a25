"""GPU checks (skipped without CUDA): the model's bf16 step runs through SDPA and agrees with fp32."""

import numpy as np
import pytest
import torch

from beit.train.model import BeitForMIM, ModelConfig, mim_loss
from beit.train.pretrain.masking import block_mask

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

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "speed"))
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
    from beit.tokenize.stage1 import TokenizeConfig

    command = Precision.resolve(TokenizeConfig.precision, TokenizeConfig.tf32, pixels.device)
    assert command.tf32 and command.body == "fp16"
    assert (command.tokenize(model, pixels) == reference).float().mean() >= 0.99


def synthetic_batch(batch: int, grid: tuple[int, int], vocab: int, image_size: int, device: str | None = None):
    """A pre-training batch as `PretrainData` makes it for a GPU trainer: the masks training
    draws, padded to 75 positions, and every host tensor in page-locked memory (or all of it on
    `device`, as DALI's GPU output is)."""
    from beit.shared.counter import counter_key
    from beit.train.pretrain.data import Batch
    from beit.train.pretrain.masking import block_masks, masked_positions

    masks = block_masks(counter_key(0, 0, np.arange(batch), 2), grid, 75, min_block=16).reshape(batch, -1)
    positions, valid = masked_positions(masks, 75)
    tensors = {
        "pixels": torch.randn(batch, 3, image_size, image_size),
        "tokens": torch.randint(0, vocab, (batch, grid[0] * grid[1])),
        "mask": torch.from_numpy(masks),
        "positions": torch.from_numpy(positions),
        "valid": torch.from_numpy(valid),
    }
    moved = {k: v.to(device) if device else v.pin_memory() for k, v in tensors.items()}
    return Batch(**moved, images=np.arange(batch))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_pretraining_step_never_waits_for_the_gpu(accumulation):
    """The trainer's step (`MIMStep`: copies from pinned memory, static shapes, backward, clipping,
    fused AdamW) runs with torch.cuda.set_sync_debug_mode("error"): any host synchronisation raises."""
    from beit.train.pretrain.trainer import MIMStep, PretrainConfig, param_groups

    torch.manual_seed(0)
    model = BeitForMIM(ModelConfig(preset="small", drop_path=0.1)).cuda()
    cfg = PretrainConfig(accumulation=accumulation)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, fused=True)
    step = MIMStep(model, model, optimizer, cfg, torch.device("cuda"))
    batch = synthetic_batch(16, model.cfg.grid, model.cfg.vocab_size, 224)
    step(lambda: batch, 1e-4)  # the first step allocates the optimizer's state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            grad_norm = step(lambda: batch, 1e-4)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(grad_norm) and torch.isfinite(step.sums).all() and step.sums[2] > 0


@pytest.mark.dali
def test_dali_gpu_batches_reach_torch_on_the_gpu_without_the_host(tmp_path):
    """A GPU pipeline's output is a torch tensor on the GPU (no copy through the host), with the
    values the CPU pipeline gives (lossless PNGs; GPU and CPU resampling differ by rounding)."""
    pytest.importorskip("nvidia.dali")
    from PIL import Image

    from beit.shared.decode import ImageBatches, as_tensor
    from beit.shared.views import ViewConfig, draw_views, render_builder

    rng = np.random.default_rng(0)
    files = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (96 + 8 * i, 128, 3), dtype=np.uint8)).save(path)
        files.append(path)
    sizes = np.asarray([[96 + 8 * i, 128] for i in range(4)])
    params = draw_views(0, np.arange(4), sizes, 1, ViewConfig(image_size=64))
    feeds = {"view0": [params[j, 0] for j in range(4)]}
    outputs = {}
    for device_id in (None, 0):
        batches = ImageBatches(render_builder(1, 64, "patches"), 4, device_id, 0)
        out, kept = batches.run(files, feeds)
        assert kept == [0, 1, 2, 3]
        outputs[device_id] = out[0]
    assert isinstance(outputs[0], torch.Tensor) and outputs[0].is_cuda and outputs[0].shape == (4, 3, 64, 64)
    assert isinstance(outputs[None], np.ndarray)
    difference = (outputs[0].cpu() - as_tensor(outputs[None])).abs()
    assert difference.mean() < 0.02 and difference.max() < 0.5


def test_segmenter_bf16_step_on_cuda_matches_fp32():
    """ViT-B with UperNet at the released crop: a bf16 training step's loss within 2% of fp32's,
    and every parameter gets a finite gradient."""
    from beit.train.segment.model import BeitSegmenter, segmentation_loss

    torch.manual_seed(0)
    model = BeitSegmenter(ModelConfig(preset="base", image_size=512, num_classes=150, drop_path=0.0)).cuda()
    pixels = torch.randn(2, 3, 512, 512, device="cuda")
    labels = torch.randint(0, 150, (2, 512, 512), device="cuda")
    labels[:, :32] = 255
    model.eval()  # the same BatchNorm statistics and no dropout in both passes
    with torch.no_grad():
        reference, _ = segmentation_loss(model, pixels, labels)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = segmentation_loss(model, pixels, labels)
    loss.backward()
    assert abs(loss.item() - reference.item()) < 0.02 * reference.item()
    for name, p in model.named_parameters():
        if name.startswith("auxiliary_head"):
            continue  # the auxiliary head runs in training only
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.dali
def test_segmentation_batches_decode_and_augment_on_the_gpu(tmp_path):
    """Segmentation's training batch with DALI decoding on the GPU and mmseg's ops in torch on the
    decoded image there: pixels on the GPU, labels in page-locked host memory, and the values the
    CPU path gives (lossless PNG scenes; GPU and CPU resampling differ by rounding)."""
    pytest.importorskip("nvidia.dali")
    from beit.shared.datasets.fashion_scenes import write_scenes
    from beit.train.segment.data import SegmentationData
    from beit.train.segment.datasets import read_segmentation

    write_scenes(tmp_path / "scenes", train=8, val=2, seed=0)
    source = read_segmentation(tmp_path / "scenes", "train")
    batches = {}
    for device_id in (None, 0):
        data = SegmentationData(source, 64, 4, True, seed=0, scale=(112, 64), device_id=device_id)
        batches[device_id] = data.batch(0)
    (gpu_pixels, gpu_labels), (cpu_pixels, cpu_labels) = batches[0], batches[None]
    assert gpu_pixels.is_cuda and gpu_pixels.shape == (4, 3, 64, 64) and not cpu_pixels.is_cuda
    assert gpu_labels.is_pinned() and torch.equal(gpu_labels, cpu_labels)  # nearest neighbour: the same labels
    difference = (gpu_pixels.cpu() - cpu_pixels).abs()
    assert difference.mean() < 0.02 and difference.max() < 0.5
