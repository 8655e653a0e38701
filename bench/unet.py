"""A diffusion UNet's training step: full fine-tuning, PEFT LoRA and SaRA at 1%, against the frozen floor.

The model: a diffusers UNet2DModel (--size px, 3 channels, --channels per level, one ResNet block per
level, self-attention at the lowest resolution), randomly initialised (seed 0); a batch of --batch
random images, the noise-prediction loss of `sparsedelta.models.diffusion.noise_loss` (DDPM, random
timesteps and noise, fixed per step). Every method targets the same layers, every nn.Conv2d and
nn.Linear (`layer_suffixes`, the task's default):

    floor      every weight frozen, the noisy input requiring grad: the backward through every layer
               with input gradients only (what no method can go below)
    full       every parameter trained
    lora       PEFT LoRA r = 8, alpha 16 on those layers (conv kernels included: PEFT's conv LoRA)
    sara       SaRA at --density (1%) of the targeted entries (the globally smallest |θ|), its nuclear-norm
               penalty λ = 5e-4 on one random 2-D weight per step, conv kernels through the conv fast path

Per round each method runs --steps timed steps after one warm-up, interleaved over --rounds; the
table gives the median step, min-max over rounds, ratios to full and the time above the floor, and
the peak bytes of live tensors in one step (the profiler's memory timeline, as bench/bench.py).

    PYTHONPATH=src .venv/bin/python bench/unet.py            # the recorded size
    PYTHONPATH=src .venv/bin/python bench/unet.py --quick    # a smoke run, seconds

Writes bench/results/unet.json (unet-quick.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import step_table  # noqa: E402  (bench/ is not a package)

METHODS = ("floor", "full", "lora", "sara")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 128, 128], help="channels per level")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method and round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="batch 2, 8 x 8 images, channels 8 16, 2 rounds of 2 steps")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.channels, args.rounds, args.steps = 2, 8, [8, 16], 2, 2
    if args.output is None:
        args.output = HERE / "results" / ("unet-quick.json" if args.quick else "unet.json")
    return args


def make_unet(args):
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    levels = len(args.channels)
    down = ("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",)
    up = ("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1)
    return UNet2DModel(sample_size=args.size, in_channels=3, out_channels=3, block_out_channels=tuple(args.channels),
                       layers_per_block=1, down_block_types=down, up_block_types=up,
                       norm_num_groups=min(8, args.channels[0]), attention_head_dim=8)  # fmt: skip


def prepared(method: str, args):
    """(model, optimizer or None, extra-loss function or None, whether the input needs grad)."""
    import torch

    import sparsedelta as sd
    from sparsedelta.methods import sara
    from sparsedelta.models.diffusion import layer_suffixes

    unet = make_unet(args)
    targets = layer_suffixes(unet)
    if method == "floor":
        unet.requires_grad_(False)
        return unet, None, None, True
    if method == "full":
        return unet, torch.optim.AdamW(unet.parameters(), lr=1e-4), None, False
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(unet, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4), None, False
    config = sd.SaRAConfig(density=args.density, target_modules=targets, rank_penalty=5e-4)
    sd.prepare(unet, config)
    optimizer = torch.optim.AdamW(sd.trainable_parameters(unet), lr=1e-4)
    return unet, optimizer, (lambda: sara.rank_penalty(unet, 5e-4)), False


def make_step(model, optimizer, extra, input_grad: bool, args):
    import torch
    from diffusers import DDPMScheduler

    from sparsedelta.models.diffusion import noise_loss

    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(args.batch, 3, args.size, args.size, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    timesteps = torch.randint(0, 1000, (args.batch,), generator=gen)
    scheduler = DDPMScheduler(num_train_timesteps=1000)

    class Noised:  # the floor: a scheduler whose noisy sample requires grad, so backward reaches every layer
        config = scheduler.config

        @staticmethod
        def add_noise(a, b, t):
            return scheduler.add_noise(a, b, t).requires_grad_(True)

    schedule = Noised if input_grad else scheduler

    def step():  # gradients zeroed first, so those a step leaves can be counted after it
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss = noise_loss(model, schedule, x0, noise, timesteps)
        if extra is not None:
            loss = loss + extra()
        loss.backward()
        if optimizer is not None:
            optimizer.step()

    return step


def run(args) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from bench import peak_tensor_mib

    torch.set_num_threads(args.threads)
    setups = {m: prepared(m, args) for m in METHODS}
    steps = {m: make_step(*setups[m], args) for m in METHODS}
    for method in METHODS:
        steps[method]()  # warm-up: optimizer state, allocator
    times = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for method in METHODS:
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[method]()
            times[method].append((time.perf_counter() - start) / args.steps)
    results = {}
    for method in METHODS:
        model, optimizer = setups[method][:2]
        trained = sum(p.numel() for g in optimizer.param_groups for p in g["params"]) if optimizer else 0
        results[method] = {
            "median_s": statistics.median(times[method]),
            "min_s": min(times[method]),
            "max_s": max(times[method]),
            "peak_tensor_mib": peak_tensor_mib(steps[method]),
            "trained_entries": trained,
            "dense_grad_entries": sum(p.grad.numel() for p in model.parameters() if p.grad is not None),
        }
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    return step_table.report(args, run(args))


if __name__ == "__main__":
    sys.exit(main())
