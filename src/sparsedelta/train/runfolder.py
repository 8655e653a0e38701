"""A run folder and what goes in it.

    config.json        the resolved run configuration (every setting, the method's config, the labels)
    metrics.json       per-step loss, per-evaluation metrics, timings, memory, budget
    delta.safetensors  the product, in the core format (+ delta_config.json); `model/` for --method
                       full, `adapter/` for --method lora
    training.png       loss and validation metric over steps
    density.png        selected fraction per layer and tensor type
    checkpoint.pt      the latest checkpoint while training runs (removed at the end)

Every file is written atomically (a temporary file, then a rename), so a run killed at any moment
leaves either the previous version or the new one.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from ..core.atomic import atomic_write
from ..errors import UsageError

CONFIG = "config.json"
METRICS = "metrics.json"
CHECKPOINT = "checkpoint.pt"
RUNS = "runs"  # where runs go without --output-dir


def new_run_path(method: str, root: str | os.PathLike = RUNS) -> Path:
    """A new, empty folder `root/<date>-<time>-<method>[-N]`, created here: os.mkdir is atomic, so two
    runs started in the same second get two folders."""
    stem = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{method}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = stem if n == 1 else stem.with_name(f"{stem.name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UsageError(f"{stem.parent} holds thousands of runs named {stem.name}*; pass --output-dir")


def peak_memory_mib() -> float:
    """Peak resident memory of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class RunFolder:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # -- creation and lookup -----------------------------------------------------------------------
    def check_new(self) -> None:
        """Refuse to start a new run over an existing one or over a file."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--output-dir {self.path} is a file, not a folder; choose a new folder")
        if (self.path / CONFIG).exists():
            raise UsageError(
                f"{self.path} already holds a run; continue it with `sparsedelta train --resume {self.path}` "
                "or choose another --output-dir"
            )

    @classmethod
    def existing(cls, path: str | os.PathLike) -> RunFolder:
        folder = cls(path)
        if not folder.path.exists():
            raise UsageError(f"run folder {folder.path} does not exist; pass the folder printed by `sparsedelta train`")
        if not (folder.path / CONFIG).exists():
            raise UsageError(f"{folder.path} is not a run folder (no {CONFIG}); pass the folder `sparsedelta train` wrote")
        return folder

    # -- files -------------------------------------------------------------------------------------
    def write_json(self, name: str, data: dict) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / name
        text = json.dumps(data, indent=2, default=_json_default) + "\n"
        atomic_write(target, lambda tmp: tmp.write_text(text))
        return target

    def read_json(self, name: str) -> dict:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read {self.path / name} ({e}); the run folder is damaged") from e

    @property
    def config(self) -> dict:
        return self.read_json(CONFIG)

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    def save_checkpoint(self, state: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.checkpoint_path, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self) -> dict:
        if not self.checkpoint_path.exists():
            done = (self.path / METRICS).exists() and "test" in self.read_json(METRICS)
            raise UsageError(
                f"{self.path} has no checkpoint to resume from"
                + (": the run already finished" if done else "; it stopped before its first checkpoint (--checkpoint-every)")
            )
        try:  # tensors and plain containers only: a checkpoint file runs no code when read
            return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, not a torch file, or objects a checkpoint never holds
            raise UsageError(
                f"{self.checkpoint_path} cannot be read ({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); "
                "the checkpoint is damaged: start the run again"
            ) from e

    def remove_checkpoint(self) -> None:
        self.checkpoint_path.unlink(missing_ok=True)


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
