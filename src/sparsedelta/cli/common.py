"""Small helpers the subcommands share: printing results, durations, reading a run folder."""

from __future__ import annotations

import json


def print_result(result: dict, as_json: bool, line: str) -> int:
    print(json.dumps(result) if as_json else line)
    return 0


def duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes}m {s:02d}s" if minutes else f"{seconds:.1f}s"
