"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write through `write(tmp_path)` beside `path`, flush it to disk, and rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike):
    """Yield a new temporary folder beside `path` to fill; when the block ends without an error it is
    renamed to `path` (absent, or an empty folder), else removed: nobody sees half a folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.is_dir():
            path.rmdir()  # empty (the caller refuses a folder with files in it)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
