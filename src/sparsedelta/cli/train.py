"""`sparsedelta train`: fine-tune with any method on any task and write a run folder."""

from __future__ import annotations

import os

from ..errors import UsageError
from ..methods import method_names
from .common import duration
from .flags import add_field_groups, check_task_flags, given, parse_options

NAME = "train"
RESUME_KEEPS = ("threads", "device")  # what --resume may change of a stopped run


def add(sub) -> None:
    p = sub.add_parser(
        NAME,
        help="fine-tune; with no arguments: MiniLM-L6 on BBC News with SaRA",
        description="Fine-tune with a sparse delta (or a baseline) and write a run folder. With no arguments: the "
        "embedded MiniLM-L6 on BBC News (5 topics) with SaRA; --task causal-lm: SmolLM2-135M on the KJV.",
        epilog="`sparsedelta methods` lists every method with its --option settings.",
    )
    add_method_flags(p)
    p.set_defaults(fields=add_field_groups(p, ("data", "model", "optimisation", "run")))
    r = p.add_argument_group("resume")
    r.add_argument("--resume", metavar="RUN_FOLDER", help="continue a stopped run with its saved settings")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def add_method_flags(p) -> None:
    m = p.add_argument_group("task and method")
    m.add_argument("--task", choices=["classification", "causal-lm", "sft", "diffusion"],
                   help="classification (default); causal-lm: SmolLM2-135M + the KJV by default; sft (instruction "
                   "tuning, the loss on the answers): SmolLM2-135M-Instruct + BBC News as topic questions; diffusion "
                   "(a diffusers UNet, the noise-prediction loss): a UNet of digits 0-4 adapted to 5-9")  # fmt: skip
    m.add_argument("--method", help=" | ".join(method_names()) + " (default sara; `sparsedelta methods` describes them)")
    budget = m.add_mutually_exclusive_group()
    budget.add_argument("--threshold", type=float, help="train entries with |θ| below it (SaRA's default 1e-3)")
    budget.add_argument("--density", type=float, help="train this fraction of the targeted entries instead")
    m.add_argument("--target-modules", nargs="+", metavar="NAME",
                   help="modules that get a delta: names or their last parts (default: the task's)")  # fmt: skip
    m.add_argument("--target-regex", help="instead, a regular expression matching whole module names")
    m.add_argument("--exclude-modules", nargs="+", metavar="NAME")
    m.add_argument("--parameter-kinds", nargs="+", metavar="KIND", help="weight bias embedding norm (default: weight)")
    m.add_argument("--modules-to-save", nargs="+", metavar="NAME", help="trained densely (default: the new head)")
    m.add_argument("--structured", action="store_true", help="diff-pruning: the structured variant (= --option structured=true)")
    m.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method setting, e.g. rank_penalty=5e-3 (sara), r=16 (lora); see `sparsedelta methods`")  # fmt: skip
    m.add_argument("--lr", type=float, help="learning rate (default: the method's for the task)")
    m.add_argument("--head-lr", type=float, help="learning rate of the densely trained head (default 5e-3 next to a delta)")
    m.add_argument("--seed", type=int, help="seed of the run: head, data order, the method's choices (default 0)")


def method_values(args) -> dict:
    """The task and method flags given, as TrainConfig fields."""
    if args.target_regex and args.target_modules:
        raise UsageError("give --target-modules or --target-regex, not both")
    values = {
        "task": args.task, "method": args.method, "threshold": args.threshold, "density": args.density,
        "target_modules": args.target_regex or args.target_modules, "exclude_modules": args.exclude_modules,
        "parameter_kinds": args.parameter_kinds, "modules_to_save": args.modules_to_save, "lr": args.lr,
        "head_lr": args.head_lr, "seed": args.seed,
    }  # fmt: skip
    options = parse_options(args.option + (["structured=true"] if args.structured else []))
    if options:
        values["options"] = options
    return {k: v for k, v in values.items() if v is not None}


def run(args) -> int:
    from ..train.config import TrainConfig
    from ..train.loop import train
    from ..train.runfolder import RunFolder

    values = {**method_values(args), **given(args, args.fields)}
    if args.resume:
        extra = [k for k in values if k not in RESUME_KEEPS]
        if extra:
            flags = ", ".join("--" + k.replace("_", "-") for k in extra)
            raise UsageError(f"--resume continues a run with its saved settings; drop {flags}")
        folder = RunFolder.existing(args.resume)
        cfg = TrainConfig.from_dict({**folder.config["train"], **values, "output_dir": str(folder.path)})
        result = train(cfg, resume=True, progress=not args.no_progress)
    else:
        cfg = TrainConfig(**values)
        check_task_flags(given(args, args.fields), args.fields, cfg.task)
        result = train(cfg, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(report(result))
    return 0


def report(result) -> str:
    """The end of a run in a few lines: the test metric, what was trained, time and memory."""
    t, b, m = result.test, result.budget, result.metrics
    timings = m["timings"]
    if m.get("task") == "causal-lm":
        before = m.get("baseline", {}).get("test", {}).get("perplexity")
        lines = [f"test perplexity: {t['perplexity']:.3f}" + (f" (before training {before:.3f})" if before else "")]
        if "sample" in m.get("samples", {}):
            lines.append(f"sample before: {m.get('baseline', {}).get('sample', '')!r}")
            lines.append(f"sample after:  {m['samples']['sample']!r}")
    elif m.get("task") == "sft":
        before = m.get("baseline", {}).get("test", {})
        lines = [f"test answer perplexity: {t['perplexity']:.3f}" + (f" (before training {before['perplexity']:.3f})" if before else "")]
        if "exact_match" in t:
            was = f" (before training {before['exact_match']:.4f})" if "exact_match" in before else ""
            lines.append(f"test exact match: {t['exact_match']:.4f}{was} on {t['examples']} examples")
        for old, new in zip(m.get("baseline", {}).get("answers", []), m.get("samples", {}).get("answers", []), strict=False):
            lines.append(f"expected {new['expected']!r}: before {old['generated']!r}, after {new['generated']!r}")
    elif m.get("task") == "diffusion":
        before = m.get("baseline", {}).get("test", {}).get("loss")
        lines = [f"test denoising loss: {t['loss']:.5f}" + (f" (before training {before:.5f})" if before is not None else "")
                 + f" on {t['images']} images at fixed noise"]  # fmt: skip
        lines.append(f"sample grids: {result.folder / 'samples_before.png'}, {result.folder / 'samples_after.png'}")
    else:
        lines = [f"test accuracy: {t['accuracy']:.4f} (macro-F1 {t['macro_f1']:.4f}, loss {t['loss']:.4f}, {t['examples']} examples)"]
    if b.selected is not None:
        lines.append(
            f"trainable: {b.trainable:,} entries: {b.selected:,} delta entries ({b.density:.3%} of {b.eligible:,} "
            f"targeted) + {b.dense:,} head entries trained densely; base model {b.total:,}"
        )
    else:
        lines.append(f"trainable: {b.trainable:,} of {b.total:,} entries ({b.density:.3%})")
    ranks = m.get("method_report", {}).get("ranks")
    if ranks is not None:  # SoRA: what the pruned adapter keeps
        r = m["method_report"]
        kept = " ".join(str(k) for k in ranks.values())
        lines.append(f"surviving ranks: {r['nonzero_gates']:,} of {r['gates']:,} gates (r = {r['r']} per layer): {kept}")
    lines.append(
        f"wall time: {duration(timings['total_s'])} (training {duration(timings['train_s'])}, "
        f"{timings['steps_per_s']:.2f} steps/s; evaluation {duration(timings['eval_s'] + timings.get('test_s', 0))})"
        + (f" over {timings['segments']} segments" if timings.get("segments", 1) > 1 else "")
    )
    peaks = m["memory"]["peak_rss_mib"]
    lines.append(f"peak memory: {max(peaks):,.0f} MiB (max resident set size" + (", per process)" if len(peaks) > 1 else ")"))
    lines.append(f"run folder: {result.folder}")
    return "\n".join(lines)

