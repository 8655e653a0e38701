"""`sparsedelta eval`: a finished run's test metrics, on its own test split or on other data."""

from __future__ import annotations

from .common import add_threads_flag, print_result, use_threads
from .flags import add_field_groups, check_task_flags, given

NAME = "eval"


def add(sub) -> None:
    p = sub.add_parser(NAME, help="evaluate a trained run (base model + its product) on its test split or other data")
    p.add_argument("run", help="the run folder written by `sparsedelta train`")
    p.set_defaults(fields=add_field_groups(p, ("data",)) | add_field_groups(p, ("model", "optimisation"),
                   only={"model", "max_length", "eval_batch_size"}))  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_threads_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.finished import load_run
    from ..train.runfolder import RunFolder

    use_threads(args.threads)
    overrides = given(args, args.fields)
    model = overrides.pop("model", None)
    check_task_flags(overrides, args.fields, RunFolder.existing(args.run).config["train"].get("task", "classification"))
    finished = load_run(args.run, model, overrides)
    task, runner = finished.task, finished.runner
    result = task.evaluate(finished.model, "test")
    base = runner.disabled(finished.model) if task.base_is_meaningful else None
    if base is not None:
        with base:
            result["base"] = task.evaluate(finished.model, "test")
    source = finished.cfg.test_file or "the run's test split"
    if task.name == "causal-lm":
        line = f"{source}: perplexity {result['perplexity']:.3f} on {result['tokens']:,} tokens"
    elif task.name == "sft":
        line = f"{source}: answer perplexity {result['perplexity']:.3f} on {result['tokens']:,} answer tokens"
        if "exact_match" in result:
            line += f", exact match {result['exact_match']:.4f} on {result['examples']} examples"
    elif task.name == "diffusion":
        line = f"{source}: denoising loss {result['loss']:.5f} on {result['images']} images at fixed noise"
    else:
        line = (f"{source}: accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}, "
                f"loss {result['loss']:.4f} on {result['examples']} examples")  # fmt: skip
    if "base" in result:
        line += f" (base model: {task.metric} {result['base'][task.metric]:.4f})"
    return print_result(result, args.json, line)
