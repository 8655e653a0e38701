"""Convolutions: a training step of a small conv net, full fine-tuning against SaRA's conv fast path
and the generic path it replaced.

The net: Conv2d 3 → 64, then --layers Conv2d 64 → 64 (3 × 3, padding 1, ReLU), a global average pool
and a 10-way linear head; a batch of --batch random 3 × 32 × 32 images with random labels, float32.
Methods (AdamW, lr 1e-3; the head is trained densely in every method):

    full       every parameter trained
    sara       SaRA at --density of each conv kernel (per tensor), through the conv fast path
               (ops.ConvDelta: F.conv forward, the layer's dense weight gradient gathered at k and freed)
    generic    the same delta with the conv entries taken out of patching.FAST_PATHS: the kernel is
               swapped for AddDelta's view and autograd's own conv backward gives the dense gradient
               that AddDelta gathers (the path every conv took before)

Per round, each method runs --steps timed steps after one warm-up, in turn (interleaved over --rounds);
the table gives the median step time, its spread over rounds (min-max), the ratio to full, and the
peak bytes of live tensors during one step (the profiler's memory timeline, as bench/bench.py).

    .venv/bin/python bench/conv.py              # the recorded run (BENCHMARKS.md, "Convolutions")
    .venv/bin/python bench/conv.py --quick      # a smoke run, seconds

Writes bench/results/conv.json (conv-quick.json).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import step_table  # noqa: E402  (bench/ is not a package)

METHODS = ("full", "sara", "generic")
CONV_PATHS = tuple(f"torch.nn.modules.conv.Conv{n}d" for n in (1, 2, 3))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4, help="64 → 64 conv layers after the first")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method and round")
    parser.add_argument("--threads", type=int, default=1, help="1: on a shared 2-core machine, 2 threads ran the smoke size 100 × slower")
    parser.add_argument("--quick", action="store_true", help="batch 2, 8 × 8 images, 16 channels, 2 rounds of 2 steps")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.channels, args.layers, args.rounds, args.steps = 2, 8, 16, 2, 2, 2
    if args.output is None:
        args.output = HERE / "results" / ("conv-quick.json" if args.quick else "conv.json")
    return args


def make_net(args):
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = [nn.Conv2d(3, args.channels, 3, padding=1), nn.ReLU()]
    for _ in range(args.layers):
        layers += [nn.Conv2d(args.channels, args.channels, 3, padding=1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(args.channels, 10)]
    return nn.Sequential(*layers)


def prepared(method: str, args):
    """(model, optimizer, the context its steps run in) for one method."""
    import torch

    import sparsedelta as sd

    model = make_net(args)
    if method == "full":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3), contextlib.nullcontext
    head = str(len(model) - 1)
    config = sd.SaRAConfig(density=args.density, per_tensor=True, rank_penalty=0.0, modules_to_save=[head])
    sd.prepare(model, config)
    optimizer = torch.optim.AdamW(sd.trainable_parameters(model), lr=1e-3)
    return model, optimizer, (generic_path if method == "generic" else contextlib.nullcontext)


@contextlib.contextmanager
def generic_path():
    """Convolutions without their fast path, as before it existed."""
    from sparsedelta.core import patching

    taken = {p: patching.FAST_PATHS.pop(p) for p in CONV_PATHS}
    try:
        yield
    finally:
        patching.FAST_PATHS.update(taken)


def patching_untouched() -> bool:
    """Whether every conv type has its fast path again (after `generic_path`)."""
    from sparsedelta.core import patching

    return all(p in patching.FAST_PATHS for p in CONV_PATHS)


def make_step(model, optimizer, args):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def dense_grads(model) -> int:
    """Entries of .grad held on parameters after a step (the frozen kernels must hold none)."""
    return sum(p.grad.numel() for p in model.parameters() if p.grad is not None)


def run(args) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from bench import peak_tensor_mib

    torch.set_num_threads(args.threads)
    setups = {m: prepared(m, args) for m in METHODS}
    steps, times = {}, {m: [] for m in METHODS}
    for method, (model, optimizer, context) in setups.items():
        steps[method] = make_step(model, optimizer, args)
        with context():
            steps[method]()  # warm-up: optimizer state, allocator
    for _ in range(args.rounds):
        for method in METHODS:
            with setups[method][2]():
                start = time.perf_counter()
                for _ in range(args.steps):
                    steps[method]()
                times[method].append((time.perf_counter() - start) / args.steps)
    results = {}
    for method in METHODS:
        model, optimizer, context = setups[method]
        with context():
            peak = peak_tensor_mib(steps[method])
        trained = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
        results[method] = {
            "median_s": statistics.median(times[method]),
            "min_s": min(times[method]),
            "max_s": max(times[method]),
            "peak_tensor_mib": peak,
            "trained_entries": trained,
            "dense_grad_entries": dense_grads(model),
        }
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    return step_table.report(args, run(args))


if __name__ == "__main__":
    sys.exit(main())
