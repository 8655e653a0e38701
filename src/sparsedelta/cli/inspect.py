"""`sparsedelta inspect`: what is in a delta file (per tensor: entries, density, values, size) and a PNG."""

from __future__ import annotations

import json
from pathlib import Path

NAME = "inspect"


def add(sub) -> None:
    p = sub.add_parser(NAME, help="per-tensor count, density, value statistics, size and fingerprint of a delta")
    p.add_argument("path", help="a run folder, a delta folder, a delta.safetensors file, or a SoRA state folder")
    p.add_argument("--png", help="where to write the figure (default: inspect.png beside the delta file)")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report.inspection import delta_file, format_summary, sora_state_dir, summarize

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
