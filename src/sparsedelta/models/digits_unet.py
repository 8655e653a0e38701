"""The embedded diffusion model: a small UNet2DModel pre-trained here on scikit-learn's handwritten
digits 0-4 (16x16 grey), which `--task diffusion` then adapts to the digits 5-9.

Why this: it installs offline from PyPI (scikit-learn ships the 1,797 digits inside its wheel), it
is small enough to pre-train on a laptop CPU in about two minutes, and "adapt a model of some digits
to the other digits" is a real domain shift that a sample grid shows at a glance. It is built once
and cached as a diffusers pipeline folder (unet/ + scheduler/) under the user's cache folder:
$SPARSEDELTA_CACHE, else $XDG_CACHE_HOME/sparsedelta, else ~/.cache/sparsedelta. The build writes
into a temporary folder and renames it into place, so a killed build or two builds at once never
leave a half-written model.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..data.images import digits

NAME = "digits-unet-v1"  # bump when the recipe below changes: a new name, a new cache entry
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
ADAPT_CLASSES = (5, 6, 7, 8, 9)
SIZE = 16
PRETRAIN_STEPS = 500
BATCH = 32
LR = 2e-3
SEED = 0


def cache_root() -> Path:
    if os.environ.get("SPARSEDELTA_CACHE"):
        return Path(os.environ["SPARSEDELTA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparsedelta"


def unet_config() -> dict:
    """Two resolutions (16 and 8 px), self-attention at 8 px: 0.7 M parameters; 25 conv kernels hold 80% of the
    695,872 entries of its 51 conv and linear weights."""
    return {
        "sample_size": SIZE, "in_channels": 1, "out_channels": 1, "block_out_channels": (32, 64), "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8, "attention_head_dim": 8,
    }  # fmt: skip


def embedded_model(log=print, steps: int = PRETRAIN_STEPS) -> Path:
    """The cached pipeline folder of the embedded UNet, built first if it is not there yet."""
    folder = cache_root() / (NAME if steps == PRETRAIN_STEPS else f"{NAME}-{steps}steps")
    if (folder / "unet" / "config.json").is_file():
        return folder
    log(f"building the embedded diffusion model (once): a UNet pre-trained on digits 0-4, {steps} steps; cached in {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        build(tmp, steps, log)
        try:
            os.rename(tmp, folder)  # atomic; fails if another process finished first, whose copy is as good
        except OSError:
            if not (folder / "unet" / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build(folder: Path, steps: int = PRETRAIN_STEPS, log=print) -> None:
    """Pre-train the UNet on digits 0-4 (all 901 of them; AdamW, warm-up then cosine) and save it with
    its DDPM scheduler into `folder` (unet/, scheduler/)."""
    from diffusers import DDPMScheduler, UNet2DModel

    from .diffusion import noise_loss

    images = digits(PRETRAIN_CLASSES, SIZE).images
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)  # the UNet's initial weights
    unet = UNet2DModel(**unet_config())
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR)
    warmup = max(1, steps // 20)
    lr_at = lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / steps))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    started, unet = time.perf_counter(), unet.train()
    for step in range(steps):
        x0 = images[torch.randint(0, len(images), (BATCH,), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH,), generator=generator)
        loss = noise_loss(unet, scheduler, x0, noise, timesteps)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0:
            log(f"  pre-training step {step + 1}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
    unet.eval().save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "README.md").write_text(
        f"# {NAME}\n\nA diffusers UNet2DModel (16x16 grey) pre-trained by sparsedelta on scikit-learn's digits "
        f"{','.join(map(str, PRETRAIN_CLASSES))} for {steps} steps of {BATCH} (seed {SEED}); the default base of "
        "`sparsedelta train --task diffusion`, which adapts it to the digits 5-9.\n"
    )
