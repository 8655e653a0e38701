"""Training: the one loop (`train`), its settings (`TrainConfig`), the tasks it runs, run folders,
checkpoints, several processes, and the Hugging Face Trainer callback (`train.hf`)."""

from .config import TrainConfig
from .finished import load_run
from .loop import RunResult, train

__all__ = ["RunResult", "TrainConfig", "load_run", "train"]
