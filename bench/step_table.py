"""What bench/conv.py and bench/unet.py print and write: each method's step time (median and the
spread over rounds) and peak of live tensors against full fine-tuning's, with, when the results
have a "floor" (every weight frozen), each step's time above it."""

from __future__ import annotations

import json


def table(results: dict) -> str:
    full, floor = results["full"], results.get("floor")
    width = max(8, *(len(m) + 2 for m in results))
    head = f"{'method':<{width}}{'step ms':>9}{'min-max ms':>16}{'×full':>7}"
    lines = [head + (f"{'−floor ms':>11}" if floor else "") + f"{'peak MiB':>10}{'×full':>7}{'trained':>11}"]
    for method, r in results.items():
        peak = r["peak_tensor_mib"] if r["peak_tensor_mib"] is not None else float("nan")
        spread = f"{1e3 * r['min_s']:.1f}-{1e3 * r['max_s']:.1f}"
        above = f"{1e3 * (r['median_s'] - floor['median_s']):>11.1f}" if floor else ""
        lines.append(
            f"{method:<{width}}{1e3 * r['median_s']:>9.1f}{spread:>16}{r['median_s'] / full['median_s']:>7.2f}{above}"
            f"{peak:>10.2f}{peak / (full['peak_tensor_mib'] or float('nan')):>7.2f}{r['trained_entries']:>11,}"
        )
    return "\n".join(lines)


def report(args, results: dict) -> int:
    """Print the table and write the results with the settings (all of args but --output) to --output."""
    import torch

    print(table(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    args.output.write_text(json.dumps({"settings": settings, "torch": torch.__version__, "methods": results}, indent=2))
    return 0
