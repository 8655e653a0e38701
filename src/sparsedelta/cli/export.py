"""`sparsedelta export`: a run's delta (or a delta folder) as a PEFT SHiRA adapter, which
`PeftModel.from_pretrained(base, DIR)` loads without sparsedelta (see `interop/to_peft.py`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .common import new_folder

NAME = "export"
FORMATS = ("shira",)


def add(sub) -> None:
    p = sub.add_parser(NAME, help="write a run's delta (or a delta folder) as a PEFT SHiRA adapter",
                       description="Write a sparse delta as a PEFT SHiRA adapter (adapter_config.json + "
                       "adapter_model.safetensors) that PEFT loads with the same outputs, without sparsedelta.")  # fmt: skip
    p.add_argument("source", metavar="RUN_OR_DELTA", help="a run folder of a delta method, or a delta folder or hub id")
    p.add_argument("--to", choices=FORMATS, default="shira", help="the PEFT adapter type (default shira)")
    p.add_argument("--output", required=True, help="the adapter folder to write (new or empty)")
    p.add_argument("--model", help="the base model: required for a delta folder; for a run, instead of the recorded one")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..core.io import DELTA_FILE, read
    from ..core.remote import locate
    from ..interop import export_shira
    from ..train.bases import is_run, model_base, run_base, run_product

    output = new_folder(args.output)
    if is_run(args.source):
        product = run_product(args.source)
        if product == "adapter":
            raise UsageError(f"{args.source} is a PEFT run: its product {Path(args.source) / 'adapter'} already is a PEFT "
                             "adapter (PeftModel.from_pretrained(base, that folder))")  # fmt: skip
        if product is None:
            raise UsageError(f"{args.source} holds no sparse delta (ordinary fine-tuning?); nothing to export")
        base = run_base(args.source, args.model)
    else:
        if not args.model:
            raise UsageError(f"{args.source} is not a run folder: give its base model with --model PATH_OR_HUB_ID")
        _, tensors = read(locate(args.source, DELTA_FILE))
        stored = {k: tuple(v.shape) for k, v in tensors.items() if not k.endswith((".indices", ".values"))}
        base = model_base(args.model, stored)
    report = export_shira(args.source, base.model, output, base_model_name_or_path=base.name)
    print(report)
    print(f"load it with PEFT (sparsedelta not needed):\n  {_base_line(base)}\n"
          f"  model = peft.PeftModel.from_pretrained(base, {str(output)!r})")  # fmt: skip
    return 0


def _base_line(base) -> str:
    name = repr(base.name or getattr(base.model, "name_or_path", "BASE_MODEL"))
    if base.kind == "classification":
        return f"base = transformers.AutoModelForSequenceClassification.from_pretrained({name}, num_labels={base.num_labels})"
    return f"base = transformers.AutoModelForCausalLM.from_pretrained({name})"

