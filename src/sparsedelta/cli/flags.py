"""Command-line flags made from the settings' dataclass fields, so each setting is declared once
(its type, default and help live with the field in `TrainConfig` / `MethodSettings`).

Every generated flag defaults to None on the command line; `settings(args, ...)` keeps only the
flags actually given, so the dataclass (and the task) decide the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from ..errors import UsageError
from ..train.config import TrainConfig

GROUP_TITLES = {
    "data": "data (default: the embedded BBC News, split 70/10/20 stratified; causal-lm: the KJV by chapter; diffusion: the digits 5-9)",
    "model": "model",
    "optimisation": "optimisation",
    "run": "run",
}
# fields with a flag of their own making (not generated): the method group and a few special forms
SPECIAL = {"method", "task", "threshold", "density", "target_modules", "exclude_modules", "parameter_kinds",
           "modules_to_save", "options", "lr", "head_lr", "seed"}  # fmt: skip


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _kind(hint) -> type:
    """The scalar type of a field's annotation (int, float, str, bool, or list for list[str])."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    first = args[0]
    return list if typing.get_origin(first) is list else first


def add_field_groups(parser: argparse.ArgumentParser, groups: tuple[str, ...], only: set[str] | None = None) -> dict:
    """Add TrainConfig's fields of these groups (or just `only`) as flags; returns {dest: field}."""
    hints = typing.get_type_hints(TrainConfig)
    made, sections = {}, {}
    for f in dataclasses.fields(TrainConfig):
        group = f.metadata.get("group")
        if f.name in SPECIAL or group not in groups or (only is not None and f.name not in only):
            continue
        if group not in sections:
            sections[group] = parser.add_argument_group(GROUP_TITLES[group])
        kind, tasks = _kind(hints[f.name]), f.metadata.get("tasks")
        text = f.metadata["help"] + (f" [{', '.join(tasks)} only]" if tasks else "")
        if f.default not in (None, dataclasses.MISSING) and "(default" not in text:
            text += f" (default {f.default})"
        text = text.replace("%", "%%")
        if kind is bool:
            sections[group].add_argument(flag_of(f), dest=f.name, action="store_true", default=None, help=text)
        elif kind is list:
            # a repeated flag (--text-column a --text-column b) for sentence pairs
            sections[group].add_argument(flag_of(f), dest=f.name, action="append", metavar="NAME", help=text)
        else:
            metavar = "FILE" if f.name.endswith("_file") else {int: "N", float: "X"}.get(kind, f.name.split("_")[-1].upper())
            sections[group].add_argument(flag_of(f), dest=f.name, type=kind, metavar=metavar, help=text)
        made[f.name] = f
    return made


def given(args: argparse.Namespace, fields: dict) -> dict:
    """The generated flags the user wrote: field name -> value."""
    return {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}


def check_task_flags(values: dict, fields: dict, task: str) -> None:
    """Refuse a flag that does not apply to the task, naming it."""
    for name in values:
        tasks = fields[name].metadata.get("tasks")
        if tasks and task not in tasks:
            raise UsageError(f"{flag_of(fields[name])}: only for --task {' or '.join(tasks)}, not --task {task}")


def parse_options(items: list[str]) -> dict:
    """--option KEY=VALUE pairs; a value is read as JSON (numbers, true/false, null, lists), else a string."""
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


def add_base_flags(parser: argparse.ArgumentParser) -> None:
    """--model, --task, --labels: the base model of deltas given without a run folder (compose, predict)."""
    base = parser.add_argument_group("base model (default: the one the first run folder records)")
    base.add_argument("--model", metavar="PATH_OR_HUB_ID", help="the base model: needed when every input is a bare delta")
    base.add_argument("--task", choices=("classification", "causal-lm"),
                      help="bare deltas: the model's kind (default: a classifier when the delta saves a head)")  # fmt: skip
    base.add_argument("--labels", type=lambda text: text.split(","), metavar="A,B,...",
                      help="bare classification deltas: the label names, comma-separated")  # fmt: skip
