"""The base model and its deltas for `sparsedelta serve`, loaded as `predict` loads them: run folders
bring their base (and an sft run its chat template), bare deltas need --model (default SmolLM2)."""

from __future__ import annotations

from pathlib import Path

from ..core.io import DeltaFileError, load
from ..errors import UsageError
from ..train.bases import delta_source
from ..train.finished import bare_base
from ..train.predict import load_groups
from ..train.tasks import GENERATIVE
from ..train.tasks.sft import CHAT_TEMPLATE


def load_served(adapters: dict[str, str], model: str | None = None):
    """(model, tokenizer, adapter names, {adapter: its run's chat template}, the base's name)."""
    sources = {name: delta_source(path) for name, path in adapters.items()}
    kinds = {s.task for s in sources.values() if s.task}
    if kinds - set(GENERATIVE):
        raise UsageError(f"serve answers with text: the run folders are {sorted(kinds)}, not causal-lm or sft runs")
    if kinds or (model is not None and sources):
        groups = load_groups(sources, model, None if kinds else "causal-lm")
        cfg, task = groups[0].cfg, groups[0].task
    else:  # no run folder and no --model: the embedded default base
        cfg, task = bare_base(model, "causal-lm")
        for name, source in sources.items():
            try:
                load(task.model, source.file, adapter_name=name)
            except DeltaFileError as e:
                raise DeltaFileError(f"--adapter {name}={source.given}: {e}") from None
    if task.name not in GENERATIVE:
        raise UsageError(f"serve needs a causal language model; this base is a {task.name} model")
    templates = {n: (s.run / CHAT_TEMPLATE).read_text() for n, s in sources.items() if s.run and (s.run / CHAT_TEMPLATE).is_file()}
    name = Path(str(cfg.model)).name if cfg.model else "base"
    return task.model, task.tokenizer, list(sources), templates, name
