"""How several deltas overlap: per tensor and pair, shared positions, sign conflicts, cosines; a PNG.

The numbers that decide whether deltas merge well: many shared positions with opposite signs is
the interference TIES resolves; a low cosine of the shared values means the tasks pull those
weights different ways. Computed on positions and values only (algebra.py's `intersect`).
"""

from __future__ import annotations

import math
import os
import string
from itertools import combinations
from pathlib import Path

import matplotlib
import torch

from ..core.algebra import Entries, intersect
from ..core.io import DeltaFileError, read
from ..errors import UsageError
from .inspection import delta_file
from .plots import layer_and_kind

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _label(i: int) -> str:
    return string.ascii_uppercase[i] if i < 26 else f"D{i}"


def _cosine(dot: float, sq_a: float, sq_b: float) -> float | None:
    return dot / math.sqrt(sq_a * sq_b) if sq_a > 0 and sq_b > 0 else None


def _pair_numbers(a: Entries, b: Entries) -> dict:
    ia, ib = intersect(a, b)
    va, vb = a.values[ia].double(), b.values[ib].double()
    return {
        "entries_a": len(a.values),
        "entries_b": len(b.values),
        "shared": len(ia),
        "sign_conflicts": int((va * vb < 0).sum()),
        "dot": float(va @ vb),
        "shared_sq_a": float(va @ va),
        "shared_sq_b": float(vb @ vb),
        "sq_a": float(a.values.double().square().sum()),
        "sq_b": float(b.values.double().square().sum()),
    }


def _rates(n: dict) -> dict:
    """Fractions and cosines from the sums in `n` (the same for a tensor and for the totals)."""
    n["shared_fraction"] = (
        n["shared"] / min(n["entries_a"], n["entries_b"]) if min(n["entries_a"], n["entries_b"]) else 0.0
    )
    union = n["entries_a"] + n["entries_b"] - n["shared"]
    n["jaccard"] = n["shared"] / union if union else 0.0
    n["conflict_fraction"] = n["sign_conflicts"] / n["shared"] if n["shared"] else 0.0
    n["cosine_shared"] = _cosine(n["dot"], n["shared_sq_a"], n["shared_sq_b"])
    n["cosine"] = _cosine(n["dot"], n["sq_a"], n["sq_b"])
    return n


def compare(paths: list[str | os.PathLike]) -> dict:
    """Compare delta files pairwise, tensor by tensor.

    Args:
        paths: two or more delta folders, run folders or delta files (each read and verified).

    Returns:
        {"inputs": [{label, path, method, entries}], "tensors": names in order, "pairs": [{a, b,
        tensors: {name: numbers}, total: numbers}]}, with per tensor and in total: entries_a,
        entries_b, shared (positions both have), shared_fraction (of the smaller delta), jaccard,
        sign_conflicts (shared positions with values of opposite sign) and conflict_fraction (of the
        shared), cosine_shared (of the values at the shared positions) and cosine (of the whole
        deltas, absent entries counting as 0); a cosine is None where a side is all zero. A tensor
        only one delta has counts with 0 entries on the other side."""
    if len(paths) < 2:
        raise UsageError(f"compare needs at least two deltas, got {len(paths)}")
    files = [delta_file(p) for p in paths]
    deltas, shapes, inputs = [], {}, []
    for i, file in enumerate(files):
        meta, tensors = read(file)
        delta = {}
        for name, fp in meta["fingerprint"].items():
            if shapes.setdefault(name, fp["shape"]) != fp["shape"]:
                raise DeltaFileError(
                    f"{name} has shape {tuple(fp['shape'])} in {file} but {tuple(shapes[name])} in an earlier input: "
                    "positions of different shapes cannot be compared; compare deltas of one base"
                )
            delta[name] = Entries(tensors[f"{name}.indices"].long(), tensors[f"{name}.values"])
        deltas.append(delta)
        inputs.append(
            {
                "label": _label(i),
                "path": str(file),
                "method": meta["config"].get("method"),
                "entries": sum(len(e.values) for e in delta.values()),
            }
        )
    names = list(shapes)
    pairs = []
    for i, j in combinations(range(len(deltas)), 2):
        per_tensor = {}
        for name in names:
            a, b = (
                d.get(name, Entries(torch.zeros(0, dtype=torch.long), torch.zeros(0))) for d in (deltas[i], deltas[j])
            )
            per_tensor[name] = _pair_numbers(a, b)
        total = {key: sum(t[key] for t in per_tensor.values()) for key in next(iter(per_tensor.values()))}
        pairs.append(
            {
                "a": _label(i),
                "b": _label(j),
                "tensors": {n: _rates(t) for n, t in per_tensor.items()},
                "total": _rates(total),
            }
        )
    return {"inputs": inputs, "tensors": names, "pairs": pairs}


def _fmt_cos(c: float | None) -> str:
    return f"{c:+.3f}" if c is not None else "-"


def format_comparison(result: dict) -> str:
    """The comparison as text: the inputs, then per pair a table of tensors and a total row."""
    lines = [f"{d['label']} = {d['path']}  ({d['method']}, {d['entries']:,} entries)" for d in result["inputs"]]
    width = max([len(n) for n in result["tensors"]] + [len("total")])
    header = (
        f"{'tensor':<{width}} {'entries a':>10} {'entries b':>10} {'shared':>9} {'of min':>7} "
        f"{'conflicts':>9} {'of shared':>9} {'cos shared':>10} {'cos all':>8}"
    )
    for pair in result["pairs"]:
        lines += ["", f"{pair['a']} vs {pair['b']}", header]
        rows = list(pair["tensors"].items()) + [("total", pair["total"])]
        for name, t in rows:
            lines.append(
                f"{name:<{width}} {t['entries_a']:>10,} {t['entries_b']:>10,} {t['shared']:>9,} "
                f"{t['shared_fraction']:>7.1%} {t['sign_conflicts']:>9,} {t['conflict_fraction']:>9.1%} "
                f"{_fmt_cos(t['cosine_shared']):>10} {_fmt_cos(t['cosine']):>8}"
            )
    return "\n".join(lines)


def comparison_plot(result: dict, path: str | os.PathLike, title: str = "") -> Path:
    """PNG: per tensor (x) and pair (one line each), the shared fraction, the sign-conflict fraction
    of the shared positions and the cosine of the shared values."""
    names = result["tensors"]
    labels = []
    for name in names:
        layer, kind = layer_and_kind(name)
        labels.append(kind if layer is None else f"{layer}.{kind}")
    panels = [
        ("shared_fraction", "shared positions\n(of the smaller delta)", (0, 1.05)),
        ("conflict_fraction", "sign conflicts\n(of the shared)", (0, 1.05)),
        ("cosine_shared", "cosine of the\nshared values", (-1.05, 1.05)),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.28 * len(names) + 3), 8), sharex=True)
    x = range(len(names))
    for ax, (key, ylabel, ylim) in zip(axes, panels, strict=True):
        for pair in result["pairs"]:
            ys = [pair["tensors"][n][key] for n in names]
            ys = [math.nan if y is None else y for y in ys]
            ax.plot(x, ys, "o-", ms=3, lw=1, label=f"{pair['a']} vs {pair['b']}")
        ax.set(ylabel=ylabel, ylim=ylim)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, ncol=min(4, len(result["pairs"])))
    axes[-1].set_xticks(list(x), labels, rotation=90, fontsize=6)
    legend = "; ".join(f"{d['label']} = {Path(d['path']).parent.name or d['path']}" for d in result["inputs"])
    fig.suptitle(title or legend, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
