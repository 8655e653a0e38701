"""Small helpers the subcommands share: printing results, durations, a new output folder."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError


def add_threads_flag(parser) -> None:
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: one per idle core, by the load average)")


def use_threads(requested: int | None) -> int:
    """Set torch's CPU threads to `requested`, or one per idle core (train.threads.pick_threads)."""
    import torch

    from ..train.threads import pick_threads

    torch.set_num_threads(pick_threads(requested))
    return torch.get_num_threads()


def print_result(result: dict, as_json: bool, line: str) -> int:
    print(json.dumps(result) if as_json else line)
    return 0


def duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes}m {s:02d}s" if minutes else f"{seconds:.1f}s"


def new_folder(path: str) -> Path:
    """--output: a folder that does not exist yet or is empty."""
    output = Path(path)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UsageError(f"--output {output} exists and is not empty; choose a new folder")
    return output


def check_output_file(path: str | None, flag: str) -> None:
    """An output file's path must be creatable: no file where a folder is needed, no folder in its place."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {target} is a folder; name a file, e.g. {target / 'figure.png'}")
    parent = next(p for p in target.parents if p.exists())
    if not parent.is_dir():
        raise UsageError(f"{flag} {target}: {parent} is a file, not a folder; choose another path")
