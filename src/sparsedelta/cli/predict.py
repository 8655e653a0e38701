"""`sparsedelta predict`: a table of texts, each row naming its task, predicted by one base model and
its tasks' deltas in mixed-task batches (`sparsedelta.train.predict.predict`)."""

from __future__ import annotations

from .common import add_threads_flag, duration, use_threads
from .flags import add_base_flags

NAME = "predict"


def add(sub) -> None:
    p = sub.add_parser(NAME, help="predict a table of texts, each row with its own task's delta (mixed-task batches)")
    p.add_argument("--adapter", action="append", required=True, metavar="NAME=PATH",
                   help="a task: its name in the task column and its run folder, delta folder or delta file "
                        "(repeat for more tasks)")  # fmt: skip
    p.add_argument("--input-file", required=True, metavar="FILE", help="csv, tsv, json, jsonl or parquet")
    p.add_argument("--output", required=True, metavar="FILE",
                   help="csv, tsv, jsonl, json or parquet: row, task, label, score, probabilities (causal LM: generation)")  # fmt: skip
    p.add_argument("--text-column", action="append", metavar="NAME",
                   help="the text column (default: the run's, else guessed); twice for sentence pairs")  # fmt: skip
    p.add_argument("--task-column", default="task", metavar="NAME",
                   help="the column naming each row's task, '__base__' for the base model (default task; not needed "
                        "with one --adapter)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="rows per batch (default 32)")
    p.add_argument("--max-length", type=int, metavar="N", help="tokens per text (default: the run's)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="causal LM: tokens generated per row (default 32)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_flag(p)
    add_base_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.predict import parse_adapters, predict

    threads = use_threads(args.threads)
    result = predict(
        parse_adapters(args.adapter), args.input_file, args.output, text_columns=args.text_column,
        task_column=args.task_column, model=args.model, task=args.task,
        labels=args.labels, batch_size=args.batch_size,
        max_length=args.max_length, max_new_tokens=args.max_new_tokens, device=args.device,
        progress=not args.no_progress,
    )  # fmt: skip
    print(
        f"predicted {result['rows']:,} rows of {result['tasks']} task(s) in {duration(result['seconds'])}: "
        f"{result['rows_per_s']:,.1f} rows/s on {threads} thread(s) -> {result['output']}"
    )
    return 0
