"""PNG figures of a run and of a delta file (matplotlib, no display needed)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LAYER = re.compile(r"^(.*?)\.(\d+)\.(.*)$")


def layer_and_kind(path: str) -> tuple[int | None, str]:
    """"bert.encoder.layer.3.attention.self.query.weight" -> (3, "attention.self.query.weight")."""
    m = LAYER.match(path)
    return (int(m.group(2)), m.group(3)) if m else (None, path)


def training_plot(metrics: dict, path: Path) -> Path:
    steps = [s["step"] for s in metrics.get("steps", [])]
    losses = [s["loss"] for s in metrics.get("steps", [])]
    evals = [e for e in metrics.get("evals", []) if e.get("split") == "validation"]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, losses, lw=0.8, alpha=0.5, label="per step")
    if len(losses) >= 5:
        width = max(5, len(losses) // 20)
        smooth = [sum(losses[max(0, i - width + 1) : i + 1]) / len(losses[max(0, i - width + 1) : i + 1]) for i in range(len(losses))]
        ax_loss.plot(steps, smooth, lw=1.6, label=f"mean of last {width}")
    ax_loss.set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
    ax_loss.legend(loc="upper right")
    density = [(s["step"], s["expected_density"]) for s in metrics.get("steps", []) if "expected_density" in s]
    if density:  # Diff Pruning's phase 1: how sparse the L0 term has made the diff before the projection
        ax_density = ax_loss.twinx()
        ax_density.plot(*zip(*density, strict=True), color="tab:red", lw=1.2, label="expected density E[‖δ‖₀]/n")
        ax_density.set(ylabel="expected density", ylim=(0, 1.05))
        ax_density.legend(loc="center right")
    metric = metrics.get("metric", "accuracy")
    ax_val.plot([e["step"] for e in evals], [e[metric] for e in evals], "o-")
    ax_val.set(xlabel="optimizer step", ylabel=f"validation {metric}", title=f"Validation {metric}")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
    fig.suptitle(metrics.get("title", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def density_plot(selection: dict[str, tuple[int, int]], path: Path, title: str = "") -> Path:
    """Heat map: selected fraction per tensor type (rows) and layer (columns); tensors outside the
    numbered layers (embeddings, pooler) get the column "–"."""
    cells: dict[tuple[str, str], tuple[int, int]] = {}
    layers: set[int] = set()
    for name, (selected, total) in selection.items():
        layer, kind = layer_and_kind(name)
        col = "–" if layer is None else str(layer)
        if layer is not None:
            layers.add(layer)
        s, t = cells.get((kind, col), (0, 0))
        cells[(kind, col)] = (s + selected, t + total)
    kinds = sorted({k for k, _ in cells}, key=lambda k: (layer_and_kind_order(k, cells), k))
    columns = [str(i) for i in sorted(layers)] + (["–"] if any(c == "–" for _, c in cells) else [])
    grid = [[cells[(k, c)][0] / cells[(k, c)][1] if (k, c) in cells else float("nan") for c in columns] for k in kinds]
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * len(columns), 1.2 + 0.4 * len(kinds)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(j, i, f"{value:.2%}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title(title or "selected fraction per layer and tensor type", fontsize=10)
    fig.colorbar(image, ax=ax, label="selected fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layer_and_kind_order(kind: str, cells) -> int:
    """Layer-wise tensor types first, then the others."""
    return 1 if any(k == kind and c == "–" for k, c in cells) else 0


def delta_plot(summary: dict, values: dict, path: Path) -> Path:
    """For `sparsedelta inspect`: density per tensor and a histogram of all delta values."""
    tensors = summary["tensors"]
    fig, (ax_d, ax_h) = plt.subplots(1, 2, figsize=(12, max(4, 0.16 * len(tensors) + 1)))
    names = list(tensors)
    ax_d.barh(range(len(names)), [tensors[n]["density"] for n in names])
    ax_d.set_yticks(range(len(names)), names, fontsize=5 if len(names) > 40 else 7)
    ax_d.invert_yaxis()
    ax_d.set(xlabel="selected fraction", title="density per tensor")
    ax_d.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    import torch

    every = torch.cat([v.float().reshape(-1) for v in values.values()]) if values else torch.zeros(0)
    ax_h.hist(every.numpy(), bins=100, log=True)
    ax_h.set(xlabel="delta value", ylabel="entries (log)", title=f"{len(every):,} delta values")
    fig.suptitle(summary.get("path", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rank_plot(summary: dict, path: Path) -> Path:
    """For `sparsedelta inspect` of a SoRA run: the rank each layer keeps after pruning, against r."""
    layers = summary["layers"]
    names = list(layers)
    fig, ax = plt.subplots(figsize=(9, max(3, 0.18 * len(names) + 1)))
    ax.barh(range(len(names)), [layers[n]["rank"] for n in names], color="lightgray", label="r (before pruning)")
    ax.barh(range(len(names)), [layers[n]["nonzero_gates"] for n in names], color="tab:blue", label="nonzero gates (kept)")
    ax.set_yticks(range(len(names)), names, fontsize=5 if len(names) > 40 else 7)
    ax.invert_yaxis()
    ax.set(xlabel="rank", title=f"SoRA: {summary['rank_after']:,} of {summary['rank_before']:,} gates survive")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def analysis_plot(result: dict, path: Path, claimed: tuple[float, float]) -> Path:
    """For `sparsedelta analyze`: the fraction zeroed (left) and the model's quality (right) against
    the threshold, the unmodified model as a dotted line, the `claimed` harmless range marked."""
    rows = result["rows"]
    thresholds = [r["threshold"] for r in rows]
    fig, (ax_frac, ax_quality) = plt.subplots(1, 2, figsize=(12, 4.8))
    ax_frac.plot(thresholds, [r["fraction_of_targets"] for r in rows], "o-", label="of the targeted entries")
    ax_frac.plot(thresholds, [r["fraction_of_model"] for r in rows], "s--", label="of all parameters")
    ax_frac.set_yscale("log")
    ax_frac.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{100 * y:g}%"))
    ax_frac.set(ylabel="entries zeroed", title="Entries with |θ| < threshold")
    if "perplexity" in result["reference"]:
        extra = _perplexity_panel(ax_quality, thresholds, rows, result["reference"])
    else:
        extra = _embedding_panel(ax_quality, thresholds, rows, result["reference"])
    for ax in (ax_frac, ax_quality):
        ax.set_xscale("log")
        ax.set_xlabel("threshold on |θ|")
        for x in claimed:
            ax.axvline(x, color="grey", ls="--", lw=1)
        ax.axvspan(*claimed, color="grey", alpha=0.12, label=f"claimed harmless: {claimed[0]:g} … {claimed[1]:g}")
        ax.grid(alpha=0.3, which="both")
    ax_frac.legend(fontsize=8)
    handles, labels = ax_quality.get_legend_handles_labels()
    ax_quality.legend(handles + extra, labels + [h.get_label() for h in extra], fontsize=8, loc="lower left")
    title = f"{result['model']} on {result['data']}: targeted weights with |θ| < threshold set to 0"
    fig.suptitle(textwrap.fill(title, 130), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _perplexity_panel(ax, thresholds: list[float], rows: list[dict], reference: dict) -> list:
    ax.plot(thresholds, [r["perplexity"] for r in rows], "o-", color="C3", label="perplexity")
    ax.axhline(reference["perplexity"], color="C3", ls=":", label=f"unmodified {reference['perplexity']:.3f}")
    ax.set(ylabel="held-out perplexity", title="Perplexity after zeroing")
    _span_at_least(ax, reference["perplexity"] * 0.98, reference["perplexity"] * 1.02)
    return []


def _embedding_panel(ax, thresholds: list[float], rows: list[dict], reference: dict) -> list:
    """Cosine similarity on the left axis, probe accuracy on a right axis of its own (their scales
    differ); returns the right axis's lines for the shared legend."""
    ax.plot(thresholds, [r["cosine_mean"] for r in rows], "o-", color="C0", label="cosine to unmodified (mean)")
    ax.plot(thresholds, [r["cosine_min"] for r in rows], "v-", color="C1", label="cosine to unmodified (min)")
    ax.set(ylabel="cosine similarity of sentence embeddings", title="Embeddings and fixed probe after zeroing")
    right = ax.twinx()
    lines = right.plot(thresholds, [r["accuracy"] for r in rows], "s-", color="C2", label="probe accuracy (right)")
    unmodified = f"unmodified accuracy {reference['accuracy']:.4f}"
    lines.append(right.axhline(reference["accuracy"], color="C2", ls=":", label=unmodified))
    right.set_ylabel("probe accuracy", color="C2")
    _span_at_least(ax, 0.99, 1.0)
    _span_at_least(right, reference["accuracy"] - 0.02, reference["accuracy"] + 0.02)
    return lines


def _span_at_least(ax, low: float, high: float) -> None:
    """Widen the y axis to cover [low, high], so that a change of one test example or a fraction of a
    percent of perplexity does not look like a cliff."""
    bottom, top = ax.get_ylim()
    ax.set_ylim(min(bottom, low), max(top, high))
