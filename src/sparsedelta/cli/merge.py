"""`sparsedelta merge`: the base model with a run's product folded in, as an ordinary checkpoint.

Over a quantized base (--base-quantization) it writes the function trained: each quantized layer's
dequantized θ plus the delta, in float32. `--float-base` writes the original float checkpoint plus
the delta instead, and prints what that costs, measured (core/float_merge.py)."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.atomic import atomic_folder
from ..errors import UsageError

NAME = "merge"
ERROR_FILE = "merge_error.json"  # --float-base: the measured difference from the function trained
PROBE_SPLIT = "validation"  # --float-base: the run's data both models are measured on


def add(sub) -> None:
    p = sub.add_parser(NAME, help="write the base model with the run's product merged in (save_pretrained)")
    p.add_argument("run", help="the run folder written by `sparsedelta train`")
    p.add_argument("--output", required=True, help="folder for the merged model (loadable with from_pretrained)")
    p.add_argument("--model", help="the base model (default: the one recorded in the run)")
    p.add_argument("--float-base", action="store_true",
                   help="a run over a quantized base: merge the delta into the float checkpoint (--model, not quantized) "
                        "instead of the dequantized weights it was trained against; prints the difference this makes to "
                        "the weights and outputs (the default writes the function trained, exactly)")  # fmt: skip
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.finished import load_run
    from ..train.runfolder import RunFolder

    folder = RunFolder.existing(args.run)
    if folder.config["method"]["method"] == "full":
        raise UsageError(f"{folder.path} holds ordinary fine-tuning; its full model is already in {folder.path / 'model'}")
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UsageError(f"--output {output} exists and is not an empty folder; choose a new folder")
    if args.float_base:
        return merge_float_base(args, output)
    finished = load_run(args.run, args.model, splits=())
    merged = finished.runner.merged(finished.model)
    if finished.task.name == "diffusion":  # the UNet beside its scheduler (and text encoder): a pipeline folder
        from ..models.diffusion import save_pipeline

        with atomic_folder(output) as tmp:
            save_pipeline(finished.task.diffusion, merged, tmp)
        print(f"merged model written to {output} (unet/ + scheduler/: --model {output} of --task diffusion, or "
              f"{type(merged).__name__}.from_pretrained({str(output)!r}, subfolder='unet'))")  # fmt: skip
        return 0
    write_model(merged, finished.task, output)
    print(f"merged model written to {output} (load it with {loader(finished.task)}.from_pretrained)")
    if finished.cfg.base_quantization:
        print(f"the run's base was quantized ({finished.cfg.base_quantization}): the merged model holds each quantized "
              "layer's dequantized θ plus the delta in float32, the function trained (4 bytes a weight); the original "
              "float checkpoint plus the delta (--float-base) differs from it by the quantization error")  # fmt: skip
    return 0


def loader(task) -> str:
    from ..train.tasks import GENERATIVE

    return "AutoModelForCausalLM" if task.name in GENERATIVE else "AutoModelForSequenceClassification"


def write_model(model, task, output: Path) -> None:
    with atomic_folder(output) as tmp:
        model.save_pretrained(tmp)
        task.tokenizer.save_pretrained(tmp)


def merge_float_base(args, output: Path) -> int:
    """θ_float + Δ: load the run's trained model (quantized base + delta) and its float base, merge,
    measure the difference in weights and outputs (validation data), write, print."""
    from ..core.float_merge import merge_into_float_base
    from ..train.finished import load_run
    from ..train.runfolder import RunFolder

    recorded = RunFolder.existing(args.run).config
    scheme = recorded["train"].get("base_quantization")
    check_float_base(args.run, scheme, recorded["method"]["method"])
    name = args.model or recorded["train"].get("model") or "the default model"
    float_model = load_float_base(args.run, args.model, name)
    finished = load_run(args.run, args.model, splits=(PROBE_SPLIT,))
    weights = merge_into_float_base(finished.model, float_model)
    outputs, scores = measure_outputs(finished, float_model)
    record = {
        "base_quantization": scheme,
        "relative_weight_difference": {"overall": weights.overall, "layers": weights.layers},
        "outputs": outputs and vars(outputs),
        f"{PROBE_SPLIT}_{finished.task.metric}": scores,
    }
    with atomic_folder(output) as tmp:
        float_model.save_pretrained(tmp)
        finished.task.tokenizer.save_pretrained(tmp)
        (tmp / ERROR_FILE).write_text(json.dumps(record, indent=1) + "\n")
    print_float_merge(output, finished.task, scheme, weights, outputs, scores)
    return 0


def check_float_base(run: str, scheme: str | None, method: str) -> None:
    from ..train.bases import run_product

    if not scheme:
        raise UsageError("--float-base: this run's base is not quantized, and `sparsedelta merge` without it already "
                         "writes the base plus the delta exactly")  # fmt: skip
    if run_product(run) != "delta":
        raise UsageError(f"--float-base merges a sparse delta, and {run} holds another product (--method {method}); "
                         "merge it without --float-base")  # fmt: skip


def measure_outputs(finished, float_model):
    """(the logits compared on a few validation batches, or None when the task gives none; the
    validation metric of the exact model and of the float merge)."""
    from ..core.float_merge import compare_outputs

    probes = finished.task.probe_inputs(PROBE_SPLIT)
    outputs = compare_outputs(finished.model, float_model, probes) if probes else None
    models = {"exact": finished.model, "float_base": float_model}
    return outputs, {name: finished.task.evaluate(m, PROBE_SPLIT)[finished.task.metric] for name, m in models.items()}


def load_float_base(run: str, model: str | None, name: str):
    """The run's base model (`model`: another one) as training loaded it, not quantized (the same new
    head, if any); `name` says which model that is in an error."""
    from ..train.finished import load_base

    try:
        _, task = load_base(run, model, overrides={"base_quantization": None})
    except (UsageError, OSError) as e:
        raise UsageError(f"--float-base needs the float checkpoint the run's base was quantized from, {name}, and it "
                         f"could not be loaded ({e}); give its folder or hub id with --model") from e  # fmt: skip
    return task.model


def print_float_merge(output, task, scheme, weights, outputs, scores) -> None:
    name, largest = weights.largest()
    metric = task.metric
    print(f"merged into the float base model: written to {output} (load it with {loader(task)}.from_pretrained)")
    print(f"this is not the function trained: the delta was trained against the {scheme} base's dequantized weights "
          "θ_deq, and this model holds the float θ + Δ; measured:")  # fmt: skip
    print(f"  weights: ‖θ_float − θ_deq‖ / ‖θ_float‖ = {weights.overall:.4g} over the {len(weights.layers)} quantized "
          f"layers (largest {largest:.4g}, {name}; every layer in {ERROR_FILE})")  # fmt: skip
    if outputs is not None:
        rows = "tokens" if loader(task) == "AutoModelForCausalLM" else "examples"
        print(f"  outputs on {outputs.rows:,} {PROBE_SPLIT} {rows}: mean |Δ logits| {outputs.mean_abs:.4g} (largest "
              f"{outputs.max_abs:.4g}), top-1 agreement {outputs.top1_agreement:.2%} with the quantized base + delta")  # fmt: skip
    print(f"  {PROBE_SPLIT} {metric}: {scores['exact']:.6g} quantized base + delta (as trained), "
          f"{scores['float_base']:.6g} this model")  # fmt: skip
    print("  for the function trained, merge without --float-base (θ_deq + Δ in float32)")
