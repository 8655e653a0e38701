"""Accuracy study on SST-2: every method on the same training budget, learning rate tuned on validation.

    python study/sst2.py                      # the whole study (about two hours on 2 CPU cores)
    python study/sst2.py --report-only        # tables and plot from the runs already finished

Stage 1 trains every method at each learning rate of its grid with seed 0 (and once more at twice the
top rate when the top wins) and keeps the rate with the best validation accuracy; stage 2 trains the
other seeds at that rate. Each run is an ordinary
`sparsedelta train` run folder under --work-dir; a finished run (its metrics.json has test metrics)
is skipped and a stopped one resumed from its checkpoint, so an interrupted study continues where it
stopped. Test accuracy (the 872 GLUE dev sentences) is read only for the report, never for choices.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "sst2"

# name -> (train flags, centre of the learning-rate grid). The grid is centre × --lr-multipliers, widened
# once by ×2 at the top when the top rate wins (200 steps favour large rates; an edge is not a tuned rate).
METHODS: dict[str, tuple[list[str], float]] = {
    "full": (["--method", "full"], 1e-4),
    "lora": (["--method", "lora", "--target-modules", "all-linear"], 1e-3),
    "shira": (["--method", "shira"], 1e-3),
    "sara-0.5%": (["--method", "sara", "--density", "0.005"], 2e-3),
    "sara-1%": (["--method", "sara", "--density", "0.01"], 2e-3),
    "sara-2%": (["--method", "sara", "--density", "0.02"], 2e-3),
    "supertuning-1%": (["--method", "supertuning", "--density", "0.01"], 2e-3),  # Super-Tuning at SaRA's k
    "diff-pruning-0.5%": (["--method", "diff-pruning", "--density", "0.005"], 2e-4),
    "diff-pruning-structured-0.5%": (["--method", "diff-pruning", "--density", "0.005", "--structured"], 2e-4),
    "random-1%": (["--method", "random", "--density", "0.01"], 2e-3),
    "magnitude-1%": (["--method", "magnitude", "--density", "0.01"], 2e-3),
}
PRODUCTS = ("delta.safetensors", "adapter/adapter_model.safetensors", "model/model.safetensors")


@dataclass(frozen=True)
class Run:
    method: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-lr{self.lr:g}-seed{self.seed}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train/validation/test.tsv")
    p.add_argument("--model", help="base model (default: the embedded MiniLM-L6)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/sst2-study"), help="the run folders")
    p.add_argument("--results", type=Path, default=HERE / "results", help="summary.json, table.md, PNG")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lr-multipliers", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--validation-samples", type=int, default=1000, help="seeded subset used to pick the lr")
    p.add_argument("--workers", type=int, default=2,
                   help="runs in parallel, a process with --threads each; 1: one after another in this process")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def train_argv(run: Run, args: argparse.Namespace) -> list[str]:
    flags, _ = METHODS[run.method]
    data = [f"--{role}-file={args.data / f'{role}.tsv'}" for role in ("train", "validation", "test")]
    model = ["--model", args.model] if args.model else []
    return [
        "train", *data, *model, *flags, f"--lr={run.lr:g}", f"--seed={run.seed}", f"--max-steps={args.steps}",
        f"--batch-size={args.batch_size}", f"--max-length={args.max_length}", f"--eval-every={args.steps}",
        f"--max-validation-samples={args.validation_samples}", f"--threads={args.threads}",
        "--checkpoint-every=50", "--no-progress", f"--output-dir={args.work_dir / run.name}",
    ]  # fmt: skip


def finished(folder: Path) -> dict | None:
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if "test" in metrics else None


def execute(run: Run, args: argparse.Namespace) -> dict:
    """Train one run unless it has finished; resume it when a checkpoint is there."""
    folder = args.work_dir / run.name
    if (metrics := finished(folder)) is not None:
        return metrics
    argv = train_argv(run, args)
    if (folder / "checkpoint.pt").exists():
        argv = ["train", f"--resume={folder}", f"--threads={args.threads}", "--no-progress"]
    elif folder.exists():
        shutil.rmtree(folder)  # stopped before its first checkpoint: nothing to keep
    log = args.work_dir / f"{run.name}.log"
    with open(log, "w") as out:
        if args.workers == 1:  # in this process (no start-up cost; what the tests use)
            from sparsedelta.cli import main as sparsedelta_main

            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                code = sparsedelta_main(argv)
        else:
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            cmd = [sys.executable, "-m", "sparsedelta", *argv]
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0 or (metrics := finished(folder)) is None:
        raise RuntimeError(f"run {run.name} failed (exit {code}); see {log}")
    return metrics


def execute_all(runs: list[Run], args: argparse.Namespace, stage: str) -> dict[Run, dict]:
    todo = [r for r in runs if finished(args.work_dir / r.name) is None]
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=stage, unit="run")
    results = {}
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for run, metrics in zip(runs, pool.map(lambda r: execute(r, args), runs)):
            results[run] = metrics
            if run in todo:
                bar.update()
    bar.close()
    return results


def validation_accuracy(metrics: dict) -> float:
    return [e for e in metrics["evals"] if e["split"] == "validation"][-1]["accuracy"]


def stored_bytes(folder: Path) -> int:
    return next((folder / p).stat().st_size for p in PRODUCTS if (folder / p).exists())


def grid(method: str, args) -> list[float]:
    return [float(f"{METHODS[method][1] * m:.3g}") for m in args.lr_multipliers]


def best_lrs(tuned: dict[Run, dict], args) -> dict[str, float]:
    """Per method, the tried learning rate with the best validation accuracy (seed 0 runs)."""
    best = {}
    for method in args.methods:
        tried = {r.lr: m for r, m in tuned.items() if r.method == method and r.seed == args.seeds[0]}
        best[method] = max(sorted(tried), key=lambda lr, tried=tried: validation_accuracy(tried[lr]))
    return best


def tune(args, fetch) -> dict[Run, dict | None]:
    """Seed-0 runs over each grid, then one step past the top where the top won; `fetch(runs, label)`
    trains them (or only looks them up) and returns their metrics (None: not finished)."""
    first = args.seeds[0]
    tuned = fetch([Run(m, lr, first) for m in args.methods for lr in grid(m, args)], f"stage 1: lr grid, seed {first}")
    if None in tuned.values():
        return tuned
    top = {m: max(grid(m, args)) for m in args.methods}
    widened = [Run(m, 2 * top[m], first) for m, lr in best_lrs(tuned, args).items() if lr == top[m]]
    return tuned | fetch(widened, "stage 1b: one step past the top of the grid")


def study(args: argparse.Namespace) -> dict:
    args.work_dir.mkdir(parents=True, exist_ok=True)
    tuned = tune(args, lambda runs, label: execute_all(runs, args, label))
    best = best_lrs(tuned, args)
    # seed-major, so that a study cut short still has whole seeds
    others = [Run(m, best[m], s) for s in args.seeds[1:] for m in args.methods]
    execute_all(others, args, "stage 2: the other seeds at the picked rate")
    return summarize(args, tuned, best)


def summarize(args, tuned: dict[Run, dict], best: dict[str, float]) -> dict:
    summary = {"settings": settings(args), "methods": {}}
    for method in args.methods:
        runs = [Run(method, best[method], s) for s in args.seeds]
        metrics = [finished(args.work_dir / r.name) for r in runs]
        test = [m["test"]["accuracy"] for m in metrics]
        budget = metrics[0]["budget"]
        summary["methods"][method] = {
            "lr": best[method],
            "validation_by_lr": {f"{r.lr:g}": validation_accuracy(m) for r, m in tuned.items() if r.method == method},
            "test_accuracy": test,
            "mean": statistics.fmean(test),
            "std": statistics.stdev(test) if len(test) > 1 else 0.0,
            "trainable": budget["trainable"],
            "delta_entries": budget.get("selected"),
            "stored_bytes": stored_bytes(args.work_dir / runs[0].name),
            "train_s": statistics.fmean(m["timings"]["train_s"] for m in metrics),
        }
    return summary


def settings(args) -> dict:
    keys = ("steps", "batch_size", "max_length", "validation_samples", "seeds", "lr_multipliers")
    # the data as a path relative to the repository (e.g. ../shared/data/sst2), never this machine's
    data = os.path.relpath(args.data.resolve(), HERE.parent)
    return {k: getattr(args, k) for k in keys} | {"data": data, "model": args.model or "embedded MiniLM-L6"}


def report(summary: dict, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (results / "table.md").write_text(table(summary))
    plot(summary, results / "accuracy_vs_bytes.png")
    print(table(summary))


def table(summary: dict) -> str:
    rows = [
        "| method | test accuracy, mean ± std | trainable entries | stored bytes per task | lr picked | validation accuracy by lr (seed 0) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for method, r in summary["methods"].items():
        by_lr = ", ".join(
            f"{lr}: {acc:.3f}" for lr, acc in sorted(r["validation_by_lr"].items(), key=lambda x: float(x[0]))
        )
        rows.append(
            f"| {method} | {r['mean']:.4f} ± {r['std']:.4f} | {r['trainable']:,} | {r['stored_bytes']:,} | {r['lr']:g} | {by_lr} |"
        )
    return "\n".join(rows) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for method, r in summary["methods"].items():
        ax.errorbar(r["stored_bytes"], r["mean"], yerr=r["std"], fmt="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes per task (log scale)")
    ax.set_ylabel("SST-2 test accuracy (mean ± std over seeds)")
    n = len(summary["settings"]["seeds"])
    ax.set_title(f"MiniLM-L6 on SST-2: {summary['settings']['steps']} steps, {n} seed{'s' * (n > 1)} per method")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = [r for r in ("train", "validation", "test") if not (args.data / f"{r}.tsv").exists()]
    if missing:
        print(
            f"SST-2 not found: {args.data} lacks {', '.join(m + '.tsv' for m in missing)}; pass --data", file=sys.stderr
        )
        return 2
    if args.report_only:
        tuned = tune(args, lambda runs, label: {r: finished(args.work_dir / r.name) for r in runs})
        best = best_lrs(tuned, args) if None not in tuned.values() else None
        if best is None or any(
            finished(args.work_dir / Run(m, best[m], s).name) is None for m in best for s in args.seeds
        ):
            print(f"the study in {args.work_dir} has unfinished runs; run it without --report-only", file=sys.stderr)
            return 2
        summary = summarize(args, tuned, best)
    else:
        summary = study(args)
    report(summary, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
