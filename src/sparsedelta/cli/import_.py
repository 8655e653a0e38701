"""`sparsedelta import`: a PEFT adapter (SHiRA, Super-Tuning, any sparse ΔW; LoRA with --sparsify)
as a sparse delta folder, fingerprinted against its base (see `interop/from_peft.py`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .common import new_folder

NAME = "import"


def add(sub) -> None:
    p = sub.add_parser(NAME, help="turn a PEFT adapter (SHiRA, Super-Tuning, LoRA with --sparsify) into a delta",
                       description="Turn a PEFT adapter into a sparse delta folder (sparsedelta.load reads it). SHiRA "
                       "and Super-Tuning adapters and any adapter whose ΔW is sparse come over exactly; a dense ΔW "
                       "(LoRA) only with --sparsify.")  # fmt: skip
    p.add_argument("source", metavar="ADAPTER_OR_RUN",
                   help="a PEFT adapter folder, or a run folder of a PEFT method (lora, shira, supertuning)")  # fmt: skip
    p.add_argument("--output", required=True, help="the delta folder to write (new or empty)")
    p.add_argument("--model", help="the base model (default: the adapter's base_model_name_or_path, or the run's)")
    p.add_argument("--sparsify", type=float, metavar="D",
                   help="keep the D·n largest |ΔW| of each tensor (required for a dense ΔW such as LoRA's); the "
                   "relative error of ΔW is printed")  # fmt: skip
    p.set_defaults(func=run)


def run(args) -> int:
    from ..interop import import_peft
    from ..interop.peft_files import read_adapter
    from ..train.bases import is_run, model_base, run_base, run_product

    output = new_folder(args.output)
    if is_run(args.source):
        if run_product(args.source) != "adapter":
            raise UsageError(f"{args.source} is a run without a PEFT adapter; its delta is in sparsedelta's format already")
        adapter, base = Path(args.source) / "adapter", run_base(args.source, args.model)
    else:
        adapter = Path(args.source)
        config, tensors, _ = read_adapter(adapter)
        name, task_type = args.model or config.get("base_model_name_or_path"), config.get("task_type")
        if not name or not isinstance(name, str):
            raise UsageError(f"{adapter} does not name its base model; give it with --model PATH_OR_HUB_ID")
        if task_type is not None and not isinstance(task_type, str):
            raise UsageError(f"{adapter}'s adapter_config.json has task_type={task_type!r}, not a name; the adapter is damaged")
        stored = {k: tuple(v.shape) for k, v in tensors.items()}
        base = model_base(name, stored, task_type)
    report = import_peft(adapter, base.model, output, sparsify=args.sparsify)
    print(report)
    print(f"load it: sparsedelta.load(base, {str(output)!r})")
    return 0
