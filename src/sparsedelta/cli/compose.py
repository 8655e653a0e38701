"""`sparsedelta compose A B ... --how sum|mean|ties|dare|magnitude --output C`: several deltas of one
base model -> one delta file (`sparsedelta.compose`), checked against the base before anything is written."""

from __future__ import annotations

from pathlib import Path

from ..core.algebra import HOWS
from ..errors import UsageError
from .flags import add_base_flags

NAME = "compose"


def add(sub) -> None:
    p = sub.add_parser(NAME, help="combine deltas of one base model into one delta (task arithmetic, TIES, DARE, ...)")
    p.add_argument("deltas", nargs="+", metavar="DELTA", help="run folders, delta folders or delta files")
    p.add_argument("--output", required=True, metavar="FOLDER", help="the folder to write (a new or empty one)")
    p.add_argument("--how", choices=HOWS, default="sum",
                   help="sum: Σ wᵢδᵢ; mean: Σ wᵢδᵢ / Σ wᵢ; ties: trim, elect signs, disjoint mean; dare: drop and "
                        "rescale, then sum; magnitude: sum, then keep the largest (default sum)")  # fmt: skip
    p.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per delta (default 1 each; negative subtracts)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--density", type=float, metavar="D",
                        help="ties/magnitude: keep this fraction of the targeted entries (all tensors together)")  # fmt: skip
    budget.add_argument("--k", type=int, metavar="N", help="ties/magnitude: keep this many entries")
    p.add_argument("--per-tensor", action="store_true", help="ties/magnitude: count the budget in each tensor")
    p.add_argument("--drop", type=float, metavar="P", help="dare: the probability to drop each entry")
    p.add_argument("--seed", type=int, default=0, help="dare: the seed of the draws (default 0)")
    p.add_argument("--heads", default="average", metavar="average|I",
                   help="the densely saved tensors (a head): 'average' (weighted) or an input's index, from 0")  # fmt: skip
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="values' storage")
    p.add_argument("--index-encoding", choices=("int32", "elias-fano"), default="int32", help="positions' storage")
    add_base_flags(p)
    p.set_defaults(func=run)


def heads_option(value: str) -> str | int:
    if value == "average":
        return value
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"--heads {value}: give 'average' or an input's index (0, 1, ...)") from None


def run(args) -> int:
    from ..core.compose import compose
    from ..train.bases import base_for, delta_source

    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UsageError(f"--output {output} exists and is not an empty folder; choose a new folder")
    if args.weights is not None and len(args.weights) != len(args.deltas):
        raise UsageError(f"{len(args.weights)} --weights for {len(args.deltas)} deltas; give one weight per delta")
    heads = heads_option(args.heads)
    sources = [delta_source(p) for p in args.deltas]
    _, task = base_for(sources, args.model, args.task, args.labels)
    written = compose(
        task.model, [s.file for s in sources], output, weights=args.weights, how=args.how, density=args.density,
        k=args.k, drop=args.drop, seed=args.seed, per_tensor=args.per_tensor, heads=heads, dtype=args.dtype,
        index_encoding=args.index_encoding,
    )  # fmt: skip
    from ..core.io import read

    meta, _ = read(written)
    entries = sum(fp["entries"] for fp in meta["fingerprint"].values())
    print(
        f"composed {len(sources)} deltas ({args.how}): {entries:,} entries in {len(meta['fingerprint'])} tensors"
        f"{', heads ' + str(heads) if meta['saved_tensors'] else ''} -> {written}"
    )
    return 0
