"""Small helpers the subcommands share: printing results, durations, a new output folder."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError


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
