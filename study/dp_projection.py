"""Why does Diff Pruning's projection cost so much here? Phase 1's expected density and the validation
accuracy just before and after the projection, for several L0 penalties λ, on the default task.

    python study/dp_projection.py                 # 4 runs of `sparsedelta train --method diff-pruning`, ~20 min on 2 cores
    python study/dp_projection.py --report-only   # the table and the plot from the finished runs

Each run is the default Diff Pruning job (MiniLM-L6 + BBC News, 196 steps, phase 1 for the first 30%,
projection to 0.5%, phase 2) with `--option l0_penalty=λ`; the training loop logs E[‖δ‖₀]/n at every
phase-1 step and validates just before and just after the projection. A finished run is kept, so a
stopped study goes on where it was. Writes --results/dp_projection.json and dp_projection.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PENALTIES = (1.25e-7, 1e-5, 3e-5, 1e-4)  # the paper's λ, then larger ones for a short phase 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--penalties", nargs="+", type=float, default=list(PENALTIES))
    p.add_argument("--work-dir", type=Path, default=Path("runs/dp-projection"))
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--train-flags", nargs=argparse.REMAINDER, default=[], help="more `sparsedelta train` flags (last)")
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def run(penalty: float, folder: Path, flags: list[str]) -> None:
    if (folder / "metrics.json").is_file():
        return
    if (folder / "checkpoint.pt").is_file():  # a stopped run goes on from its checkpoint
        cmd = ["--resume", str(folder)]
    else:
        cmd = ["--method", "diff-pruning", "--option", f"l0_penalty={penalty}", "--output-dir", str(folder), *flags]
    subprocess.run([sys.executable, "-m", "sparsedelta", "train", *cmd, "--no-progress"], check=True)


def record(penalty: float, folder: Path) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    density = [(s["step"], s["expected_density"]) for s in metrics["steps"] if "expected_density" in s]
    before = next(e for e in metrics["evals"] if e.get("before_phase"))
    after = next(e for e in metrics["evals"] if e["step"] == before["step"] and not e.get("before_phase"))
    return {"l0_penalty": penalty, "projection_step": before["step"], "density": density,
            "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
            "final_validation": metrics["evals"][-1]["accuracy"], "test": metrics["test"]["accuracy"]}  # fmt: skip


def report(records: list[dict], results: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    lines = [(f"λ = {r['l0_penalty']:g}", r["density"]) for r in records]
    load_sst2_study().draw_density(ax, lines, "Diff Pruning phase 1 (BBC News): expected density")
    fig.tight_layout()
    fig.savefig(results / "dp_projection.png", dpi=110)
    plt.close(fig)
    lines = ["| λ | expected density at the projection | validation before → after the projection | final validation | test |",
             "|---:|---:|---|---:|---:|"]  # fmt: skip
    for r in records:
        lines.append(f"| {r['l0_penalty']:g} | {r['density'][-1][1]:.4f} | {r['accuracy_before']:.3f} → {r['accuracy_after']:.3f} "
                     f"| {r['final_validation']:.3f} | {r['test']:.4f} |")  # fmt: skip
    return "\n".join(lines)


def load_sst2_study():
    """study/sst2.py, whose density drawing this study shares (study/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sst2_study_plots", HERE / "sst2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    args = parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    records = []
    for penalty in args.penalties:
        folder = args.work_dir / f"l0-{penalty:g}"
        if not args.report_only:
            run(penalty, folder, args.train_flags)
        if (folder / "metrics.json").is_file():
            records.append(record(penalty, folder))
    if args.report_only and not records:
        path = args.results / "dp_projection.json"
        records = json.loads(path.read_text()) if path.is_file() else []
    else:
        (args.results / "dp_projection.json").write_text(json.dumps(records, indent=1) + "\n")
    print(report(records, args.results) if records else "no finished run yet")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
