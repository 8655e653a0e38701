"""SpIEL against SaRA and LoRA at equal k: step time and peak live tensors of a training step.

Built on bench/bench.py's workers (each method in its own process, MiniLM-L6 with a new 5-way head,
random tokens, AdamW); k is PEFT LoRA's r = 8 count on every linear layer ("shira-k", the same k as
SHiRA and `sara@shira-k`), or --density. Rows:

    lora                PEFT LoRA r = 8, all linear layers
    sara@K              SaRA at k (nuclear-norm penalty on, as in bench.py)
    spiel@K             SpIEL at k, a step outside an accumulation window (sampled product, as any fixed mask)
    spiel-first@K       SpIEL at k, the first step of a window: each layer's dense gradient shown to its
                        observer, which keeps the top C (C = k candidates, sized for p₀ = 0.2)
    spiel-window@K      SpIEL at k, a later step of a window: the gradient at the C + k positions (the
                        sampled product where it pays), the sums closed after the step; the worker also
                        times one drop and grow over every tensor (select s)

SpIEL's cost over a run: per R steps, one first window step, A − 1 later ones and one re-selection, so
its mean step is ((R − A) · outside + first + (A − 1) · window + select) / R, given for the official
SftConfig's R = 20, A = 5 and its scripts' R = 100.

    .venv/bin/python bench/spiel.py             # batch 32 x 128, 2 rounds (minutes on the 2-core CPU)
    .venv/bin/python bench/spiel.py --quick     # a smoke run: batch 4 x 32, one round

Writes bench/results/spiel.json (spiel-quick.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402  (bench/bench.py: the workers)

SCHEDULES = ((20, 5), (100, 5))  # (R, A): SftConfig's, its scripts'


def methods(spec: str) -> list[str]:
    return ["full", "lora", f"sara@{spec}", f"spiel@{spec}", f"spiel-first@{spec}", f"spiel-window@{spec}"]


def mean_step(outside: float, first: float, window: float, select: float, every: int, accumulate: int) -> float:
    """SpIEL's mean step over a run: per R steps, R − A plain ones, a window's first, A − 1 later window
    steps and one re-selection."""
    return ((every - accumulate) * outside + first + (accumulate - 1) * window + select) / every


def table(summary: dict[str, dict], spec: str) -> list[str]:
    """The printed rows: each method's median step, × full, peak live tensors, × full, trainable; then
    SpIEL's mean step per schedule."""
    full = summary["full"]
    lines = [f"{'method':<24}{'step s':>9}{'×full':>8}{'tensors MiB':>13}{'×full':>8}{'trainable':>12}{'select s':>10}"]
    for method in methods(spec):
        r = summary.get(method)
        if r is None:
            lines.append(f"{method:<24}  failed")
            continue
        tensors = r.get("peak_tensor_mib", float("nan"))
        select = f"{r['select_s']:>10.3f}" if "select_s" in r else ""
        lines.append(f"{method:<24}{r['step_s']:>9.3f}{r['step_s'] / full['step_s']:>8.2f}{tensors:>13.1f}"
                     f"{tensors / full.get('peak_tensor_mib', float('nan')):>8.2f}{int(r['trainable']):>12,}{select}")  # fmt: skip
    outside, first, window = (summary.get(f"{m}@{spec}") for m in ("spiel", "spiel-first", "spiel-window"))
    if outside and first and window:
        for every, accumulate in SCHEDULES:
            step = mean_step(outside["step_s"], first["step_s"], window["step_s"], window["select_s"], every, accumulate)
            lines.append(f"SpIEL's mean step, R = {every}, A = {accumulate}: {step:.3f} s = {step / full['step_s']:.2f} × full")
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="shira-k", help="k: shira-k (LoRA r=8's count) or a density such as 1%%")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="batch 4 x 32, one round of 2 steps")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.rounds, args.steps, args.warmup = 4, 32, 1, 2, 1
    output = args.output or HERE / "results" / ("spiel-quick.json" if args.quick else "spiel.json")
    worker_args = argparse.Namespace(task="classification", model=bench.default_model("classification"),
                                     batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                                     threads=args.threads)  # fmt: skip
    runs, started = [], time.time()
    for round_ in range(args.rounds):
        for method in methods(args.spec):
            print(f"round {round_ + 1}/{args.rounds}: {method}", flush=True)
            runs.append(bench.run_worker(method, worker_args))
    summary = bench.summarise(runs)
    lines = table(summary, args.spec)
    print(f"\nclassification, MiniLM-L6, batch {args.batch} x {args.seq}, k = {args.spec}\n")
    print("\n".join(lines))
    record = {"command": " ".join(["python", "bench/spiel.py", *(argv if argv is not None else sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d"), "settings": {k: v for k, v in vars(args).items() if k != "output"},
              "wall_s": time.time() - started, "summary": summary, "runs": runs, "table": lines}  # fmt: skip
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2, default=str))
    print(f"\nwrote {output}")
    return record


if __name__ == "__main__":
    main()
