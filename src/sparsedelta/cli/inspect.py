"""`sparsedelta inspect`: what is in a delta file (per tensor: entries, density, values, size) and a PNG;
given several deltas, how they overlap (per tensor and pair: shared positions, sign conflicts, cosines)."""

from __future__ import annotations

import json
from pathlib import Path

NAME = "inspect"


def add(sub) -> None:
    p = sub.add_parser(NAME, help="per-tensor count, density, value statistics, size and fingerprint of a delta; "
                                  "several deltas: how they overlap")  # fmt: skip
    p.add_argument("paths", nargs="+", metavar="path",
                   help="a run folder, a delta folder, a delta.safetensors file, or a SoRA state folder; several deltas "
                        "to compare them")  # fmt: skip
    p.add_argument("--png", help="where to write the figure (default: inspect.png, or compare.png for several, "
                                 "beside the (first) delta file)")  # fmt: skip
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report.inspection import delta_file, format_summary, sora_state_dir, summarize
    from .common import check_output_file

    check_output_file(None if args.no_png else args.png, "--png")
    if len(args.paths) > 1:
        return run_compare(args)
    args.path = args.paths[0]
    sora = sora_state_dir(args.path)
    if sora is not None:
        return run_sora(sora, args)
    summary, values = summarize(args.path)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if not args.no_png:
        from ..report.plots import delta_plot

        png = Path(args.png) if args.png else delta_file(args.path).with_name("inspect.png")
        delta_plot(summary, values, png)
        if not args.json:
            print(f"\nfigure: {png}")
    return 0


def run_sora(folder: Path, args) -> int:
    """A SoRA run or state: the rank of every layer before and after pruning, and a PNG of it."""
    from ..report.inspection import format_sora, summarize_sora

    summary = summarize_sora(folder)
    print(json.dumps(summary, indent=2) if args.json else format_sora(summary))
    if not args.no_png:
        from ..report.plots import rank_plot

        png = Path(args.png) if args.png else folder / "inspect.png"
        rank_plot(summary, png)
        if not args.json:
            print(f"\nfigure: {png}")
    return 0


def run_compare(args) -> int:
    """Several deltas: compare()'s table (per pair and tensor) and its PNG."""
    from ..errors import UsageError
    from ..report.compare import compare, comparison_plot, format_comparison
    from ..report.inspection import delta_file, sora_state_dir

    for path in args.paths:
        if sora_state_dir(path) is not None:
            raise UsageError(f"{path} is a SoRA state, not a sparse delta: inspect it on its own")
    result = compare(args.paths)
    print(json.dumps(result, indent=2) if args.json else format_comparison(result))
    if not args.no_png:
        png = Path(args.png) if args.png else delta_file(args.paths[0]).with_name("compare.png")
        comparison_plot(result, png)
        if not args.json:
            print(f"\nfigure: {png}")
    return 0
