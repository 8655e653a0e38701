"""The base model and its deltas for `sparsedelta serve`, loaded as `predict` loads them: run folders
bring their base (and an sft run its chat template), bare deltas need --model (default SmolLM2).
Classification deltas with different label sets get a base each (one head shape per model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.io import DeltaFileError, load
from ..errors import UsageError
from ..train.bases import delta_source
from ..train.finished import bare_base, delta_quantization
from ..train.predict import Group, load_groups
from ..train.tasks import GENERATIVE
from ..train.tasks.sft import CHAT_TEMPLATE

CLASSIFY = "classification"


@dataclass
class Served:
    """What a server holds: one group per base model (a causal LM has one), the deltas' chat templates."""

    groups: list[Group]
    templates: dict[str, str]
    base_name: str

    @property
    def generates(self) -> bool:
        return self.groups[0].task.name in GENERATIVE

    @property
    def names(self) -> list[str]:
        return [n for g in self.groups for n in g.names]


def load_served(adapters: dict[str, str], model: str | None = None, task: str | None = None) -> Served:
    """The base (or bases) and every adapter loaded onto it.

    Args:
        adapters: name -> run folder, delta folder or delta file.
        model: the base model (default: the first run folder's, else the embedded SmolLM2).
        task: "causal-lm" or "classification" for bare deltas (default: a classifier when the delta
            saves a head, as `predict` decides)."""
    sources = {name: delta_source(path) for name, path in adapters.items()}
    kinds = {s.task for s in sources.values() if s.task}
    if kinds - {*GENERATIVE, CLASSIFY}:
        raise UsageError(f"serve answers with text or labels: the run folders are {sorted(kinds)}, not causal-lm, sft or classification runs")
    if kinds or (model is not None and sources):
        groups = load_groups(sources, model, None if kinds else task, per_row_prompts=True)
    elif task == CLASSIFY:
        raise UsageError("a classification server needs at least one classification delta: give --adapter NAME=RUN")
    else:  # no run folder and no --model: the embedded default base
        first = next(iter(sources.values()), None)  # a delta trained over a quantized base gets that base
        cfg, made = bare_base(model, "causal-lm", quantization=first and delta_quantization(first.file))
        for name, source in sources.items():
            try:
                load(made.model, source.file, adapter_name=name)
            except DeltaFileError as e:
                raise DeltaFileError(f"--adapter {name}={source.given}: {e}") from None
        groups = [Group(list(sources), cfg, made)]
    name = groups[0].task.name
    if name not in GENERATIVE and name != CLASSIFY:
        raise UsageError(f"serve needs a causal language model or a classifier; this base is a {name} model")
    templates = {n: (s.run / CHAT_TEMPLATE).read_text() for n, s in sources.items() if s.run and (s.run / CHAT_TEMPLATE).is_file()}
    cfg = groups[0].cfg
    return Served(groups, templates, Path(str(cfg.model)).name if cfg.model else "base")
