"""What is in a delta file: per-tensor count, density and value statistics, file size, fingerprint."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..core.io import DELTA_FILE, read
from ..errors import UsageError


def delta_file(path: str | os.PathLike) -> Path:
    """The delta file of a run folder, a delta folder, or the file itself."""
    path = Path(path)
    return path / DELTA_FILE if path.is_dir() else path


def summarize(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(summary, delta values by tensor). Reading verifies the file's checksum and format."""
    file = delta_file(path)
    meta, tensors = read(file)
    per_tensor, values = {}, {}
    for name, fp in meta["fingerprint"].items():
        v = tensors[f"{name}.values"].float()
        numel = math.prod(fp["shape"])
        values[name] = v
        per_tensor[name] = {
            "shape": fp["shape"],
            "entries": len(v),
            "density": len(v) / numel,
            "mean": float(v.mean()) if len(v) else 0.0,
            "std": float(v.std()) if len(v) > 1 else 0.0,
            "min": float(v.min()) if len(v) else 0.0,
            "max": float(v.max()) if len(v) else 0.0,
            "mean_abs": float(v.abs().mean()) if len(v) else 0.0,
            "nonzero": int((v != 0).sum()),
            "base_sha256": fp["sha256"],
        }
    selected = sum(t["entries"] for t in per_tensor.values())
    targeted = sum(math.prod(t["shape"]) for t in per_tensor.values())
    dense = {n: list(tensors[n].shape) for n in meta["saved_tensors"]}
    summary = {
        "path": str(file),
        "file_bytes": file.stat().st_size,
        "method": meta["config"].get("method"),
        "config": meta["config"],
        "values_dtype": meta.get("values_dtype"),
        "content_sha256": meta.get("content_sha256"),
        "tensors": per_tensor,
        "dense_tensors": dense,
        "dense_entries": sum(math.prod(s) for s in dense.values()),
        "entries": selected,
        "targeted": targeted,
        "density": selected / max(targeted, 1),
        "bytes_per_entry": file.stat().st_size / max(selected, 1),
    }
    return summary, values


def format_summary(summary: dict) -> str:
    lines = [
        f"file        {summary['path']}  ({summary['file_bytes'] / 1024:,.1f} KiB, "
        f"{summary['bytes_per_entry']:.2f} bytes per delta entry incl. dense tensors)",
        f"method      {summary['method']}  {_short_config(summary['config'])}",
        f"values      {summary['values_dtype']}",
        f"fingerprint {summary['content_sha256'][:16]} (content sha256)",
        f"entries     {summary['entries']:,} of {summary['targeted']:,} targeted ({summary['density']:.3%}) "
        f"in {len(summary['tensors'])} tensors; dense: {summary['dense_entries']:,} in {list(summary['dense_tensors'])}",
        "",
    ]
    width = max((len(n) for n in summary["tensors"]), default=10)
    lines.append(f"{'tensor':<{width}} {'shape':>12} {'entries':>9} {'density':>8} {'mean|v|':>9} {'std':>9} {'min':>10} {'max':>10}  base")
    for name, t in summary["tensors"].items():
        shape = "x".join(str(s) for s in t["shape"])
        lines.append(
            f"{name:<{width}} {shape:>12} {t['entries']:>9,} {t['density']:>8.3%} {t['mean_abs']:>9.2e} {t['std']:>9.2e} "
            f"{t['min']:>10.2e} {t['max']:>10.2e}  {t['base_sha256'][:10]}"
        )
    return "\n".join(lines)


def _short_config(config: dict) -> str:
    keep = {k: v for k, v in config.items() if k != "method" and v not in (None, [], ())}
    return ", ".join(f"{k}={v}" for k, v in keep.items())


# -- SoRA states ------------------------------------------------------------------------------------
def sora_state_dir(path: str | os.PathLike) -> Path | None:
    """The SoRA state folder of a run folder (its `sora/`) or of a state folder itself; None if neither."""
    from ..methods.sora import CONFIG_FILE

    path = Path(path)
    for folder in (path / "sora", path):
        if (folder / CONFIG_FILE).is_file():
            return folder
    return None


def summarize_sora(folder: Path) -> dict:
    """Per layer: the branch's rank r before pruning and the nonzero gates it keeps after."""
    from ..methods.sora import CONFIG_FILE

    source = folder / CONFIG_FILE
    try:
        info = json.loads(source.read_text(errors="replace"))
    except (ValueError, RecursionError) as e:
        raise UsageError(f"{source} is not valid JSON ({str(e)[:200]}); the SoRA run is damaged") from None
    layers = info.get("layers") if isinstance(info, dict) else None
    counts = ("rank", "nonzero_gates")
    if not isinstance(layers, dict) or not all(
        isinstance(v, dict) and all(isinstance(v.get(k), int) and not isinstance(v.get(k), bool) for k in counts)
        for v in layers.values()
    ) or not isinstance(info.get("config"), dict):
        raise UsageError(f"{source} lacks its config or per-layer rank and nonzero_gates counts; the SoRA run is damaged")
    return {
        "path": str(folder),
        "method": "sora",
        "config": info["config"],
        "layers": layers,
        "rank_before": sum(v["rank"] for v in layers.values()),
        "rank_after": sum(v["nonzero_gates"] for v in layers.values()),
    }


def format_sora(summary: dict) -> str:
    lines = [
        f"folder      {summary['path']}",
        f"method      sora  {_short_config(summary['config'])}",
        f"gates       {summary['rank_after']:,} of {summary['rank_before']:,} nonzero: the pruned adapter keeps that "
        f"much rank in {sum(1 for v in summary['layers'].values() if v['nonzero_gates'])} of {len(summary['layers'])} layers",
        "",
    ]
    width = max((len(n) for n in summary["layers"]), default=10)
    lines.append(f"{'layer':<{width}} {'rank before':>11} {'after pruning':>13}")
    for name, v in summary["layers"].items():
        lines.append(f"{name:<{width}} {v['rank']:>11} {v['nonzero_gates']:>13}")
    return "\n".join(lines)
