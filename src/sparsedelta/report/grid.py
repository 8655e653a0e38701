"""A grid of images as one PNG (pillow, which diffusers depends on): the sample grids of a diffusion run."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..core.atomic import atomic_write


def grid_pixels(images: torch.Tensor, columns: int | None = None, gap: int = 1) -> torch.Tensor:
    """(n, C, H, W) in [-1, 1] -> one (rows·H + gaps, columns·W + gaps, C) uint8 picture, row by row,
    with a `gap`-pixel black border between the images."""
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = torch.zeros(c, rows * (h + gap) + gap, columns * (w + gap) + gap, dtype=torch.uint8)
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = gap + r * (h + gap), gap + col * (w + gap)
        canvas[:, top : top + h, left : left + w] = pixels[i]
    return canvas.permute(1, 2, 0).contiguous()


def save_grid(images: torch.Tensor, path: str | Path, scale: int = 4, columns: int | None = None) -> Path:
    """Write `images` as a PNG grid, each pixel drawn as scale x scale (small images stay visible)."""
    from PIL import Image

    picture = grid_pixels(images, columns)
    mode = "L" if picture.shape[2] == 1 else "RGB"
    img = Image.fromarray(picture.squeeze(2).numpy() if mode == "L" else picture.numpy(), mode=mode)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return Path(path)
