"""Adapters loaded while serving (POST /v1/adapters): where a delta may come from, only from inside
--adapters-dir or from the hub, never by `..`, an absolute path or a symbolic link leading out."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..core.io import DELTA_FILE
from ..core.remote import HUB_ID, from_hub
from ..errors import UsageError
from ..train.bases import delta_source
from ..train.tasks import GENERATIVE
from ..train.tasks.sft import CHAT_TEMPLATE

NAME = re.compile(r"[A-Za-z0-9][\w.:-]{0,63}")


class NameTaken(UsageError):
    """An adapter of that name is served already (HTTP 409)."""


@dataclass
class Found:
    """A delta to attach: its file, and the chat template of its run (None when it has none)."""

    file: Path
    template: str | None = None
    labels: list[str] | None = None  # a classification run's


def check_name(name, taken) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UsageError("name must be 1-64 letters, digits, '_', '.', ':' or '-', starting with a letter or digit")
    if name in taken:
        raise NameTaken(f"the name {name!r} is taken; unload that adapter first or choose another name")
    return name


def find(given, adapters_dir: Path | None, tasks=GENERATIVE) -> Found:
    """The delta `given` names: a path relative to `adapters_dir` when one exists there, else a hub id.

    Runs off the engine's worker (it may download); reads files but changes nothing."""
    if not isinstance(given, str) or not given:
        raise UsageError("path must be a folder or file under the server's --adapters-dir, or a hub id (user/repo)")
    parts = PurePosixPath(given.replace("\\", "/")).parts
    if given.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", given) or ".." in parts:
        raise UsageError(f"path {given!r} must stay inside --adapters-dir: no absolute path, no '..'")
    if adapters_dir is not None and (adapters_dir / given).exists():
        return _local(adapters_dir, adapters_dir / given, tasks)
    if HUB_ID.fullmatch(given) and "." not in {p[:1] for p in given.split("@")[0].split("/")}:
        return Found(from_hub(given, DELTA_FILE))
    where = f"under --adapters-dir {adapters_dir}" if adapters_dir else "(the server has no --adapters-dir)"
    raise UsageError(f"there is no {given!r} {where}, and it is not a hub id (user/repo)")


def _local(root: Path, path: Path, tasks) -> Found:
    inside = root.resolve()
    for entry in [path, *(path.iterdir() if path.is_dir() else ())]:
        if not entry.resolve().is_relative_to(inside):
            raise UsageError(f"{path.relative_to(root)} leads outside --adapters-dir through a symbolic link")
    source = delta_source(path.resolve())
    if source.task and source.task not in tasks:
        raise UsageError(f"{path.relative_to(root)} is a {source.task} run; this server serves {' or '.join(tasks)} runs")
    template = source.run / CHAT_TEMPLATE if source.run else None
    return Found(source.file, template.read_text() if template and template.is_file() else None, source.labels)
