"""`sparsedelta analyze`: zero the weights with |θ| below each threshold and measure what changes."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..errors import UsageError
from .common import duration
from .flags import add_field_groups, check_task_flags, given

NAME = "analyze"
DATA_FIELDS = {"train_file", "validation_file", "test_file", "dataset", "dataset_config", "text_columns", "label_column",
               "split_seed", "max_train_samples", "max_eval_samples", "eval_blocks", "model", "max_length"}  # fmt: skip
# the analysis's own defaults: the probe's training texts; held-out text of a causal LM
DEFAULTS = {
    "classification": {"max_train_samples": 2000, "max_length": 128, "batch_size": 64},
    "causal-lm": {"max_length": 256, "eval_blocks": 16, "batch_size": 8},
}


def add(sub) -> None:
    p = sub.add_parser(
        NAME,
        help="zero the weights with |θ| below each threshold and measure how much the model changes",
        description="Ineffective-parameter analysis: for each threshold, zero every targeted weight with |θ| below "
        "it, measure the model, restore it. An encoder (default: the embedded MiniLM-L6 on BBC News) is measured by "
        "the cosine similarity of its sentence embeddings to the unmodified ones and the accuracy of a fixed "
        "logistic-regression probe (fitted on --max-train-samples texts, default 2000); a causal LM (--task "
        "causal-lm, default SmolLM2-135M on the KJV) by held-out perplexity (--eval-blocks 16 blocks of "
        "--max-length 256 tokens by default). Writes analysis.json and analysis.png.",
    )
    p.add_argument("--task", default="classification", choices=["classification", "causal-lm"],
                   help="classification: an encoder's sentence embeddings; causal-lm: perplexity")  # fmt: skip
    p.add_argument("--thresholds", nargs="+", type=float, metavar="T",
                   help="positive thresholds on |θ| (default: 1e-5 2e-5 5e-5 1e-4 2e-4 5e-4 1e-3 2e-3 5e-3 1e-2)")  # fmt: skip
    p.set_defaults(fields=add_field_groups(p, ("data", "model"), only=DATA_FIELDS))
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, help="(default 64; 8 for causal-lm)")
    r.add_argument("--output-dir", help="where analysis.json and analysis.png go (default: runs/<time>-analyze)")
    r.add_argument("--threads", type=int, help="CPU threads (default: one per idle core)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..report.analysis import CLAIMED_RANGE, format_table
    from ..report.plots import analysis_plot
    from ..train.config import TrainConfig
    from ..train.runfolder import RunFolder, new_run_path
    from ..train.threads import pick_threads

    thresholds = analysis_thresholds(args.thresholds)
    values = given(args, args.fields)
    check_task_flags(values, args.fields, args.task)
    settings = {**DEFAULTS[args.task], **values, **({"batch_size": args.batch_size} if args.batch_size is not None else {})}
    for name in ("batch_size", "threads"):
        value = settings.get(name) if name != "threads" else args.threads
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    batch_size = settings.pop("batch_size")
    cfg = TrainConfig(task=args.task, **settings).resolved()
    out = Path(args.output_dir) if args.output_dir else new_run_path("analyze")
    if (out / "analysis.json").exists():
        raise UsageError(f"{out} already holds an analysis; choose another --output-dir")
    torch.set_num_threads(pick_threads(args.threads))
    start = time.perf_counter()
    analyze = analyze_causal_lm if args.task == "causal-lm" else analyze_encoder
    result = {**analyze(cfg, thresholds, batch_size, not args.no_progress), "threads": torch.get_num_threads()}
    result["seconds"] = time.perf_counter() - start
    RunFolder(out).write_json("analysis.json", result)
    analysis_plot(result, out / "analysis.png", CLAIMED_RANGE)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['model']} on {result['data']}: {result['targets']['entries']:,} targeted entries in "
              f"{result['targets']['tensors']} tensors, {result['model_parameters']:,} parameters\n")  # fmt: skip
        print(format_table(result))
        print(f"\nwritten: {out / 'analysis.json'}, {out / 'analysis.png'} ({duration(result['seconds'])})")
    return 0


def analysis_thresholds(values: list[float] | None) -> list[float]:
    from ..report.analysis import DEFAULT_THRESHOLDS

    if values is None:
        return list(DEFAULT_THRESHOLDS)
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise UsageError(f"--thresholds: {bad[0]:g} is not a positive threshold on |θ|; give numbers such as 1e-4 1e-3")
    return sorted(set(values))


def analyze_encoder(cfg, thresholds: list[float], batch_size: int, progress: bool) -> dict:
    from ..data.tables import load_data
    from ..models.classifier import load_encoder
    from ..report.analysis import analyze_encoder as sweep

    loaded = load_encoder(cfg.model)
    data = load_data(
        cfg.train_file, cfg.validation_file, cfg.test_file, cfg.dataset, cfg.dataset_config, cfg.text_columns,
        cfg.label_column, cfg.split_seed, max_train_samples=cfg.max_train_samples, max_eval_samples=cfg.max_eval_samples,
    )  # fmt: skip
    result = sweep(loaded.model, loaded.tokenizer, data, thresholds, cfg.max_length, batch_size, progress)
    return {
        "task": "classification",
        "model": loaded.name,
        "data": data.source,
        "settings": {
            "max_train_samples": cfg.max_train_samples,
            "max_eval_samples": cfg.max_eval_samples,
            "max_length": cfg.max_length,
            "batch_size": batch_size,
            "split_seed": cfg.split_seed,
        },
        **result,
    }


def analyze_causal_lm(cfg, thresholds: list[float], batch_size: int, progress: bool) -> dict:
    from ..data.text import evenly_spaced, pack_blocks
    from ..models.causal_lm import load_causal_lm
    from ..report.analysis import analyze_causal_lm as sweep
    from ..train.tasks.causal_lm import load_splits

    lm = load_causal_lm(cfg.model)
    splits = load_splits(cfg)
    if not splits.test:
        raise UsageError("no test text to measure; give --test-file or let the training text be split")
    blocks = evenly_spaced(pack_blocks(lm.tokenizer, splits.test, cfg.max_length), cfg.eval_blocks)
    result = sweep(lm.model, blocks, thresholds, batch_size, progress)
    return {
        "task": "causal-lm",
        "model": lm.name,
        "data": f"{splits.source} (test split)",
        "settings": {
            "block_size": cfg.max_length,
            "eval_blocks": cfg.eval_blocks,
            "batch_size": batch_size,
            "split_seed": cfg.split_seed,
        },
        **result,
    }
