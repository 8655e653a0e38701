"""`sparsedelta train | eval | inspect | merge | analyze`: a thin argparse layer over the public API.

Mistakes a user can fix are printed as one line naming the problem and the fix (exit status 2);
SPARSEDELTA_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from ..core.io import DeltaFileError
from ..errors import UsageError

ERRORS = (UsageError, DeltaFileError, FileNotFoundError, ValueError, KeyError)


# -- train -----------------------------------------------------------------------------------------
def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a classifier; with no arguments: MiniLM-L6 on BBC News with SaRA",
        description="Fine-tune a sequence classifier with a sparse delta (or a baseline) and write a run folder. "
        "With no arguments: the embedded MiniLM-L6 on BBC News (5 topics) with SaRA.",
    )
    d = p.add_argument_group("data (default: the embedded BBC News, split 70/10/20 stratified)")
    d.add_argument("--train-file", help="csv, tsv, json, jsonl or parquet")
    d.add_argument("--validation-file", help="(default: carved from the training file)")
    d.add_argument("--test-file", help="(default: carved from the training file)")
    d.add_argument("--dataset", help="a Hugging Face Hub dataset id (needs the internet or its cache)")
    d.add_argument("--dataset-config", help="the hub dataset's configuration name")
    d.add_argument("--text-column", action="append", dest="text_columns", metavar="NAME",
                   help="the text column; give it twice for sentence pairs (default: guessed)")  # fmt: skip
    d.add_argument("--label-column", help="string or integer labels (default: label, labels, class, ...)")
    d.add_argument("--split-seed", type=int, default=0, help="seed of the stratified split (default 0)")
    d.add_argument("--validation-fraction", type=float, default=0.1)
    d.add_argument("--test-fraction", type=float, default=0.2)
    d.add_argument("--max-train-samples", type=int, help="use a seeded subset of the training data")
    d.add_argument("--max-eval-samples", type=int, help="use a seeded subset of validation and test")
    d.add_argument("--max-validation-samples", type=int, help="a seeded subset of validation alone (overrides the above)")

    m = p.add_argument_group("model and method")
    m.add_argument("--task", default="classification", choices=["classification", "causal-lm"],
                   help="causal-lm: SmolLM2-135M + the KJV text by default (see README)")  # fmt: skip
    m.add_argument("--model", help="local folder or hub id (default: the embedded MiniLM-L6)")
    m.add_argument("--max-length", type=int, default=128, help="tokens per example (default 128)")
    m.add_argument("--method", default="sara", help="sara | diff-pruning | random | magnitude | full | lora | shira")
    budget = m.add_mutually_exclusive_group()
    budget.add_argument("--threshold", type=float, help="train entries with |θ| below it (SaRA default 1e-3)")
    budget.add_argument("--density", type=float, help="train this fraction of the targeted entries instead")
    m.add_argument("--target-modules", nargs="+", metavar="NAME",
                   help="modules that get a delta (name or its last parts; default: every weight matrix outside the head)")  # fmt: skip
    m.add_argument("--target-regex", help="instead, a regular expression matching whole module names")
    m.add_argument("--exclude-modules", nargs="+", metavar="NAME")
    m.add_argument("--parameter-kinds", nargs="+", metavar="KIND", help="weight bias embedding norm (default: weight)")
    m.add_argument("--modules-to-save", nargs="+", metavar="NAME", help="trained densely (default: the new head)")
    m.add_argument("--structured", action="store_true", help="diff-pruning: the structured variant (a group logit per tensor)")
    m.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method setting, e.g. rank_penalty=5e-3, reselect_step=100 (sara); r=16 (lora)")  # fmt: skip

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=float, default=2.0)
    o.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    o.add_argument("--batch-size", type=int, default=16, help="per process")
    o.add_argument("--eval-batch-size", type=int, default=64)
    o.add_argument("--lr", type=float, help="learning rate (default: the method's; SaRA 1e-3·exp(−350·threshold))")
    o.add_argument("--head-lr", type=float, help="learning rate of the densely trained head (default 5e-3 next to a delta)")
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--warmup-ratio", type=float, default=0.06)
    o.add_argument("--schedule", default="cosine", help="cosine | linear | constant")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    o.add_argument("--seed", type=int, default=0)

    r = p.add_argument_group("run folder")
    r.add_argument("--output-dir", help="the run folder (default: runs/<time>-<method>)")
    r.add_argument("--eval-every", type=int, help="validate every N steps (default: twice per epoch)")
    r.add_argument("--checkpoint-every", type=int, default=50, help="checkpoint every N steps; 0: never (default 50)")
    r.add_argument("--resume", metavar="RUN_FOLDER", help="continue a stopped run with its saved settings")
    r.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    r.add_argument("--device", help="cpu, cuda or cuda:N (default: this process's GPU if any, else the CPU)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train, parser=p)


def parse_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {item!r}: write it as KEY=VALUE, e.g. --option rank_penalty=5e-3")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a plain string
    return options


def train_config(args):
    from ..train.loop import TrainConfig

    if args.target_regex and args.target_modules:
        raise UsageError("give --target-modules or --target-regex, not both")
    return TrainConfig(
        train_file=args.train_file, validation_file=args.validation_file, test_file=args.test_file,
        dataset=args.dataset, dataset_config=args.dataset_config, text_columns=args.text_columns,
        label_column=args.label_column, split_seed=args.split_seed, validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction, max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        max_validation_samples=args.max_validation_samples, model=args.model, max_length=args.max_length, method=args.method,
        threshold=args.threshold, density=args.density, target_modules=args.target_regex or args.target_modules,
        exclude_modules=args.exclude_modules, parameter_kinds=args.parameter_kinds,
        modules_to_save=args.modules_to_save, options=parse_options(args.option + (["structured=true"] if args.structured else [])), epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, lr=args.lr,
        head_lr=args.head_lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        schedule=args.schedule, max_grad_norm=args.max_grad_norm, seed=args.seed, output_dir=args.output_dir,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, threads=args.threads, device=args.device,
    )  # fmt: skip


def run_train(args) -> int:
    from ..train.loop import TrainConfig, train
    from ..train.runfolder import RunFolder

    if args.task == "causal-lm":
        return run_train_causal_lm(args)
    if args.resume:
        given = [a for a in _explicit(args) if a not in ("resume", "no_progress", "threads", "device")]
        if given:
            flags = ", ".join("--" + a.replace("_", "-") for a in given)
            raise UsageError(f"--resume continues a run with its saved settings; drop {flags}")
        folder = RunFolder.existing(args.resume)
        saved = folder.config["train"]
        overrides = {"output_dir": str(folder.path), "threads": args.threads or saved.get("threads")}
        cfg = TrainConfig.from_dict({**saved, **overrides, "device": args.device or saved.get("device")})
        result = train(cfg, resume=True, progress=not args.no_progress)
    else:
        result = train(train_config(args), progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(report(result))
    return 0


# flags of `train` that the causal-LM job understands, and the LMTrainConfig field each one sets
CAUSAL_LM_FLAGS = {
    "model": "model", "train_file": "train_file", "validation_file": "validation_file", "test_file": "test_file",
    "text_columns": "text_column", "threshold": "threshold", "density": "density", "max_steps": "steps",
    "batch_size": "batch_size", "lr": "lr", "max_length": "block_size", "seed": "seed", "output_dir": "output_dir",
    "threads": "threads", "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm",
}  # fmt: skip


def run_train_causal_lm(args) -> int:
    from ..train.lm_train import LMTrainConfig, _summary, train_causal_lm

    given = [a for a in _explicit(args) if a not in ("task", "no_progress", "method")]
    unsupported = [a for a in given if a not in CAUSAL_LM_FLAGS]
    if unsupported:
        flags = ", ".join("--" + a.replace("_", "-") for a in unsupported)
        raise UsageError(f"--task causal-lm does not take {flags}; it takes --" + ", --".join(
            f.replace("_", "-") for f in CAUSAL_LM_FLAGS))  # fmt: skip
    if args.method != "sara":
        raise UsageError(f"--task causal-lm trains SaRA deltas for now, not --method {args.method}")
    fields = {CAUSAL_LM_FLAGS[a]: getattr(args, a) for a in given}
    if "text_column" in fields:
        if len(fields["text_column"]) != 1:
            raise UsageError("--task causal-lm takes one --text-column")
        fields["text_column"] = fields["text_column"][0]
    if "density" in fields:
        fields["threshold"] = None
    metrics = train_causal_lm(LMTrainConfig(**fields), progress=not args.no_progress)
    for key, value in _summary(metrics).items():
        print(f"{key}: {value}")
    return 0


def _causal_lm_run(path) -> bool:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("task") == "causal-lm"
    except (OSError, json.JSONDecodeError):
        return False


def _explicit(args) -> list[str]:
    """Names of the train options written on the command line (even when equal to their defaults)."""
    actions = args.parser._option_string_actions  # option string -> action; argparse has no public view
    given = [actions[token.split("=")[0]].dest for token in args.argv if token.split("=")[0] in actions]
    return list(dict.fromkeys(given))


def report(result) -> str:
    t, b, m = result.test, result.budget, result.metrics
    timings = m["timings"]
    peak = max(m["memory"]["peak_rss_mib"])
    lines = [
        f"test accuracy: {t['accuracy']:.4f} (macro-F1 {t['macro_f1']:.4f}, loss {t['loss']:.4f}, {t['examples']} examples)",
    ]
    if b.selected is not None:
        lines.append(
            f"trainable: {b.trainable:,} entries: {b.selected:,} delta entries ({b.density:.3%} of {b.eligible:,} "
            f"targeted) + {b.dense:,} head entries trained densely; base model {b.total:,}"
        )
    else:
        lines.append(f"trainable: {b.trainable:,} of {b.total:,} entries ({b.density:.3%})")
    lines.append(
        f"wall time: {_duration(timings['total_s'])} (training {_duration(timings['train_s'])}, "
        f"{timings['steps_per_s']:.2f} steps/s; evaluation {_duration(timings['eval_s'] + timings.get('test_s', 0))})"
        + (f" over {timings['segments']} segments" if timings.get("segments", 1) > 1 else "")
    )
    lines.append(f"peak memory: {peak:,.0f} MiB (max resident set size" + (", per process)" if len(m["memory"]["peak_rss_mib"]) > 1 else ")"))
    lines.append(f"run folder: {result.folder}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes}m {s:02d}s" if minutes else f"{seconds:.1f}s"


# -- eval ------------------------------------------------------------------------------------------
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run (base model + delta) on a labelled file")
    p.add_argument("run", help="the run folder written by `sparsedelta train`")
    p.add_argument("--test-file", help="csv, tsv, json, jsonl or parquet (default: the run's own test split)")
    p.add_argument("--model", help="the base model (default: the one recorded in the run)")
    p.add_argument("--text-column", action="append", dest="text_columns", metavar="NAME")
    p.add_argument("--label-column")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, help="(default: the run's)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from ..data.tables import encode, load_data, load_labelled_file
    from ..models.classifier import load_run_model
    from ..train.loop import TrainConfig, evaluate
    from ..train.runfolder import RunFolder

    if _causal_lm_run(args.run):
        from ..train.lm_train import evaluate_run

        result = evaluate_run(args.run, "test", args.model)
        return _print_result(result, args.json, f"test perplexity {result['perplexity']:.3f} "
                             f"(base model {result['base_perplexity']:.3f}) on {result['blocks']} blocks")  # fmt: skip
    folder = RunFolder.existing(args.run)
    config = folder.config
    cfg = TrainConfig.from_dict(config["train"])
    text_columns = args.text_columns or config["data"]["text_columns"]
    label_column = args.label_column or config["data"]["label_column"]
    loaded = load_run_model(config, folder.path, args.model)
    if args.test_file:
        split, source = load_labelled_file(args.test_file, config["labels"], text_columns, label_column), args.test_file
    else:
        data = load_data(
            cfg.train_file, cfg.validation_file, cfg.test_file, cfg.dataset, cfg.dataset_config, cfg.text_columns,
            cfg.label_column, cfg.split_seed, cfg.validation_fraction, cfg.test_fraction, cfg.max_train_samples,
            cfg.max_eval_samples,
        )  # fmt: skip
        split, source = data.test, f"the run's test split ({data.source})"
    encoded = encode(loaded.tokenizer, split, args.max_length or cfg.max_length)
    result = evaluate(loaded.model, encoded, loaded.tokenizer, len(config["labels"]), args.batch_size)
    return _print_result(result, args.json, f"{source}: accuracy {result['accuracy']:.4f}, macro-F1 "
                         f"{result['macro_f1']:.4f}, loss {result['loss']:.4f} on {result['examples']} examples")  # fmt: skip


def _print_result(result: dict, as_json: bool, line: str) -> int:
    print(json.dumps(result) if as_json else line)
    return 0


# -- inspect ---------------------------------------------------------------------------------------
def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="per-tensor count, density, value statistics, size and fingerprint of a delta")
    p.add_argument("path", help="a run folder, a delta folder or a delta.safetensors file")
    p.add_argument("--png", help="where to write the figure (default: inspect.png beside the delta file)")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from ..report.inspection import delta_file, format_summary, summarize

    summary, values = summarize(args.path)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if not args.no_png:
        from ..report.plots import delta_plot

        png = Path(args.png) if args.png else delta_file(args.path).with_name("inspect.png")
        delta_plot(summary, values, png)
        if not args.json:
            print(f"\nfigure: {png}")
    return 0


# -- merge -----------------------------------------------------------------------------------------
def add_merge(sub) -> None:
    p = sub.add_parser("merge", help="write the base model with the delta merged in (save_pretrained)")
    p.add_argument("run", help="the run folder written by `sparsedelta train`")
    p.add_argument("--output", required=True, help="folder for the merged model (loadable with from_pretrained)")
    p.add_argument("--model", help="the base model (default: the one recorded in the run)")
    p.set_defaults(func=run_merge)


def run_merge(args) -> int:
    from ..core.adapters import merge_and_unload
    from ..models.classifier import PEFT_METHODS, load_run_model
    from ..train.runfolder import RunFolder

    if _causal_lm_run(args.run):
        from ..train.lm_train import merge_run

        out = merge_run(args.run, args.output, args.model)
        print(f"merged model written to {out} (load it with AutoModelForCausalLM.from_pretrained)")
        return 0
    folder = RunFolder.existing(args.run)
    config = folder.config
    method = config["method"]["method"]
    if method == "full":
        raise UsageError(f"{folder.path} holds ordinary fine-tuning; its full model is already in {folder.path / 'model'}")
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise UsageError(f"--output {output} exists and is not empty; choose a new folder")
    loaded = load_run_model(config, folder.path, args.model)
    model = loaded.model.merge_and_unload() if method in PEFT_METHODS else merge_and_unload(loaded.model)
    model.save_pretrained(output)
    loaded.tokenizer.save_pretrained(output)
    print(f"merged model written to {output} (load it with AutoModelForSequenceClassification.from_pretrained)")
    return 0


# -- analyze ---------------------------------------------------------------------------------------
def add_analyze(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="zero the weights with |θ| below each threshold and measure how much the model changes",
        description="Ineffective-parameter analysis: for each threshold, zero every targeted weight with |θ| below "
        "it, measure the model, restore it. An encoder (default: the embedded MiniLM-L6 on BBC News) is measured by "
        "the cosine similarity of its sentence embeddings to the unmodified ones and the accuracy of a fixed "
        "logistic-regression probe; a causal LM (--task causal-lm, default SmolLM2-135M on the KJV) by held-out "
        "perplexity. Writes analysis.json and analysis.png.",
    )
    p.add_argument("--task", default="classification", choices=["classification", "causal-lm"],
                   help="classification: an encoder's sentence embeddings; causal-lm: perplexity")  # fmt: skip
    p.add_argument("--model", help="local folder, hub id or (causal-lm) .gguf file (default: MiniLM-L6; SmolLM2-135M)")
    p.add_argument("--thresholds", nargs="+", type=float, metavar="T",
                   help="positive thresholds on |θ| (default: 1e-5 2e-5 5e-5 1e-4 2e-4 5e-4 1e-3 2e-3 5e-3 1e-2)")  # fmt: skip

    d = p.add_argument_group("data (default: BBC News for classification, the KJV for causal-lm)")
    d.add_argument("--train-file", help="csv, tsv, json, jsonl or parquet (causal-lm: txt, jsonl or csv)")
    d.add_argument("--validation-file", help="(default: carved from the training file)")
    d.add_argument("--test-file", help="the texts measured (default: carved from the training file)")
    d.add_argument("--text-column", action="append", dest="text_columns", metavar="NAME",
                   help="the text column (default: guessed); twice for sentence pairs (classification)")  # fmt: skip
    d.add_argument("--split-seed", type=int, default=0, help="seed of the split (default 0)")
    c = p.add_argument_group("classification only")
    c.add_argument("--dataset", help="a Hugging Face Hub dataset id (needs the internet or its cache)")
    c.add_argument("--dataset-config", help="the hub dataset's configuration name")
    c.add_argument("--label-column", help="string or integer labels (default: label, labels, class, ...)")
    c.add_argument("--max-train-samples", type=int, help="training texts the probe is fitted on (default 2000)")
    c.add_argument("--max-eval-samples", type=int, help="use a seeded subset of the test texts")
    c.add_argument("--max-length", type=int, help="tokens per text (default 128)")
    lm = p.add_argument_group("causal-lm only")
    lm.add_argument("--block-size", type=int, help="tokens per held-out block (default 256)")
    lm.add_argument("--eval-blocks", type=int, help="evenly spaced blocks of the test text (default 16)")

    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, help="(default 64; 8 for causal-lm)")
    r.add_argument("--output-dir", help="where analysis.json and analysis.png go (default: runs/<time>-analyze)")
    r.add_argument("--threads", type=int, help="CPU threads (default: one per idle core)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.set_defaults(func=run_analyze)


# flags that only one task takes
ANALYZE_TASK_FLAGS = {
    "classification": ("dataset", "dataset_config", "label_column", "max_train_samples", "max_eval_samples", "max_length"),
    "causal-lm": ("block_size", "eval_blocks"),
}  # fmt: skip
ANALYZE_COUNTS = ("batch_size", "max_train_samples", "max_eval_samples", "max_length", "block_size", "eval_blocks")


def run_analyze(args) -> int:
    import torch

    from ..report.analysis import CLAIMED_RANGE, format_table
    from ..report.plots import analysis_plot
    from ..train.lm_train import pick_threads
    from ..train.runfolder import RunFolder, new_run_path

    thresholds = analysis_thresholds(args.thresholds)
    check_analyze_flags(args)
    out = Path(args.output_dir) if args.output_dir else new_run_path("analyze")
    if (out / "analysis.json").exists():
        raise UsageError(f"{out} already holds an analysis; choose another --output-dir")
    torch.set_num_threads(pick_threads(args.threads))
    start = time.perf_counter()
    analyze = analyze_causal_lm if args.task == "causal-lm" else analyze_encoder
    result = {**analyze(args, thresholds), "threads": torch.get_num_threads()}
    result["seconds"] = time.perf_counter() - start
    RunFolder(out).write_json("analysis.json", result)
    analysis_plot(result, out / "analysis.png", CLAIMED_RANGE)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['model']} on {result['data']}: {result['targets']['entries']:,} targeted entries in "
              f"{result['targets']['tensors']} tensors, {result['model_parameters']:,} parameters\n")  # fmt: skip
        print(format_table(result))
        print(f"\nwritten: {out / 'analysis.json'}, {out / 'analysis.png'} ({_duration(result['seconds'])})")
    return 0


def analysis_thresholds(values: list[float] | None) -> list[float]:
    from ..report.analysis import DEFAULT_THRESHOLDS

    if values is None:
        return list(DEFAULT_THRESHOLDS)
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise UsageError(f"--thresholds: {bad[0]:g} is not a positive threshold on |θ|; give numbers such as 1e-4 1e-3")
    return sorted(set(values))


def check_analyze_flags(args) -> None:
    other = "causal-lm" if args.task == "classification" else "classification"
    given = [f for f in ANALYZE_TASK_FLAGS[other] if getattr(args, f) is not None]
    if given:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise UsageError(f"{flags}: only for --task {other}, not --task {args.task}")
    if args.task == "causal-lm" and args.text_columns and len(args.text_columns) > 1:
        raise UsageError("--task causal-lm takes one --text-column")
    for name in (*ANALYZE_COUNTS, "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def analyze_encoder(args, thresholds: list[float]) -> dict:
    from ..data.tables import load_data
    from ..models.classifier import load_encoder
    from ..report.analysis import analyze_encoder as sweep

    loaded = load_encoder(args.model)
    max_train = args.max_train_samples or 2000
    data = load_data(
        args.train_file, args.validation_file, args.test_file, args.dataset, args.dataset_config, args.text_columns,
        args.label_column, args.split_seed, max_train_samples=max_train, max_eval_samples=args.max_eval_samples,
    )  # fmt: skip
    max_length, batch_size = args.max_length or 128, args.batch_size or 64
    result = sweep(loaded.model, loaded.tokenizer, data, thresholds, max_length, batch_size, not args.no_progress)
    return {
        "task": "classification",
        "model": args.model or "MiniLM-L6 (embedded)",
        "model_folder": loaded.name,
        "data": data.source,
        "settings": {
            "max_train_samples": max_train,
            "max_eval_samples": args.max_eval_samples,
            "max_length": max_length,
            "batch_size": batch_size,
            "split_seed": args.split_seed,
        },
        **result,
    }


def analyze_causal_lm(args, thresholds: list[float]) -> dict:
    from ..data.text import evenly_spaced, pack_blocks
    from ..models.causal_lm import load_causal_lm
    from ..report.analysis import analyze_causal_lm as sweep
    from ..train.lm_train import LMTrainConfig, load_splits

    lm = load_causal_lm(args.model)
    text_column = args.text_columns[0] if args.text_columns else None
    splits = load_splits(LMTrainConfig(
        model=args.model, train_file=args.train_file, validation_file=args.validation_file, test_file=args.test_file,
        text_column=text_column, seed=args.split_seed,
    ))  # fmt: skip
    if not splits.test:
        raise UsageError("no test text to measure; give --test-file or let the training text be split")
    block_size, eval_blocks, batch_size = args.block_size or 256, args.eval_blocks or 16, args.batch_size or 8
    blocks = evenly_spaced(pack_blocks(lm.tokenizer, splits.test, block_size), eval_blocks)
    result = sweep(lm.model, blocks, thresholds, batch_size, not args.no_progress)
    return {
        "task": "causal-lm",
        "model": lm.name,
        "model_folder": lm.folder,
        "data": f"{splits.source} (test split)",
        "settings": {
            "block_size": block_size,
            "eval_blocks": eval_blocks,
            "batch_size": batch_size,
            "split_seed": args.split_seed,
        },
        **result,
    }


# -- entry point -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="sparsedelta",
        description="Selective fine-tuning by unstructured masking: each task is a sparse delta over a frozen model.",
    )
    parser.add_argument("--version", action="version", version=f"sparsedelta {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,inspect,merge,analyze}")
    for add in (add_train, add_eval, add_inspect, add_merge, add_analyze):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("sparsedelta: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ERRORS as e:
        if os.environ.get("SPARSEDELTA_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        hint = "" if isinstance(e, (UsageError, DeltaFileError)) else " (SPARSEDELTA_DEBUG=1 shows the traceback)"
        print(f"sparsedelta {args.command}: error: {message}{hint}", file=sys.stderr)
        return 2
