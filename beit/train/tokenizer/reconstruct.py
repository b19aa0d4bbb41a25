"""`beit tokenizer reconstruct`: a picture that shows at a glance what a tokenizer keeps.

One row per image: the original (resized and centre-cropped to the tokenizer's input size),
its reconstruction from the argmax tokens, and the token-id map (one colour per code).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from beit.shared.dvae import DVAE
from beit.shared.images import read_image


def token_colours(vocab: int) -> np.ndarray:
    """A fixed, well-spread colour per code id: [vocab, 3] uint8."""
    hue = (np.arange(vocab) * 0.618033988749895) % 1.0
    value = 0.55 + 0.45 * ((np.arange(vocab) * 7) % 5) / 4
    i = np.floor(hue * 6).astype(int)
    f = hue * 6 - i
    p, q, t = np.zeros_like(hue), 1 - f, f
    rgb = np.choose(
        i[:, None] % 6,
        [
            np.stack([np.ones_like(hue), t, p], 1),
            np.stack([q, np.ones_like(hue), p], 1),
            np.stack([p, np.ones_like(hue), t], 1),
            np.stack([p, q, np.ones_like(hue)], 1),
            np.stack([t, p, np.ones_like(hue)], 1),
            np.stack([np.ones_like(hue), p, q], 1),
        ],
    )
    return (rgb * value[:, None] * 255).astype(np.uint8)


def reconstruction_grid(model: DVAE, files: list[Path], out: Path, size: int | None = None) -> list[float]:
    """Write the PNG grid; returns each image's PSNR (dB) of reconstruction vs original."""
    from PIL import Image

    size = size or model.input_size
    pixels = torch.stack([read_image(f, size) for f in files])
    tokens = model.tokenize(pixels)
    recon = model.reconstruct(tokens)
    mse = ((recon - pixels) ** 2).flatten(1).mean(1)
    psnrs = [10 * math.log10(1 / max(m, 1e-10)) for m in mse.tolist()]

    colours = token_colours(model.cfg.vocab_size)
    cell = max(size, 96)
    pad = 4
    grid = np.full((len(files) * (cell + pad) + pad, 3 * (cell + pad) + pad, 3), 255, dtype=np.uint8)

    def place(row: int, col: int, image: np.ndarray, smooth: bool) -> None:
        resample = Image.LANCZOS if smooth else Image.NEAREST
        image = np.asarray(Image.fromarray(image).resize((cell, cell), resample))
        y, x = pad + row * (cell + pad), pad + col * (cell + pad)
        grid[y : y + cell, x : x + cell] = image

    to_uint8 = lambda t: (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()  # noqa: E731
    for row in range(len(files)):
        place(row, 0, to_uint8(pixels[row]), smooth=True)
        place(row, 1, to_uint8(recon[row]), smooth=True)
        place(row, 2, colours[tokens[row].numpy()], smooth=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out)
    return psnrs
