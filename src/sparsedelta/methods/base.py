"""The contract between a training loop and a method: `MethodRunner`, and `DeltaRunner` for every
method whose product is a sparse delta.

A runner's hooks, in the order a loop calls them:

    prepare(model, head_modules, total_steps, default_targets)
                                       attach the method; freeze the rest
    param_groups(model)                optimizer groups, each with its own lr
    phase_starts(total_steps)          steps where the lr schedule starts afresh (default [0])
    before_step(model, step, scale)    before each step's forward, taken or not, with the loss scale its
                                       backward uses (fp16; else 1): for a method reading raw gradients
    extra_loss(model, step)            a term added to the task loss (e.g. SaRA's nuclear norm)
    after_optimizer_step(model, opt)   right after optimizer.step(), at the lr of that step (SoRA's
                                       proximal step on its gates)
    on_step(model, step, optimizer)    after each optimizer step taken (re-selection, a new phase); set
                                       `params_changed` after swapping the trainable tensors and the
                                       loop builds a new optimizer
    finish(model)                      after the last step; runs an event that is still overdue
    report(model)                      what the run's summary should show of the method (e.g. ranks)
    save(model, tokenizer, folder)     the run's product;  load(model, folder) puts it on a base again;
                                       merged(model) gives a plain model; disabled(model) the base

Schedule events: `step` counts every step of the run, including one that fp16 loss scaling skipped
(so it stays the lr schedule's step), but `after_optimizer_step` and `on_step` run only after a step
the optimizer really took. An event scheduled at step N therefore fires at the first taken step at or
after N: a runner tests `step >= N` and remembers that the event happened (in its state_dict, so a
resumed run agrees), never `step == N`, which a skipped step N would lose for good. If the run ends
before a taken step reaches it, `finish` runs the event when the product depends on it (Diff
Pruning's projection).

`folder` is the run folder while the built-in loop drives the runner (None otherwise), for files a
method writes during training (SoRA's stage checkpoints).

Checkpoints: `state_dict(model)` must hold everything that decides the next step besides the
optimizer: the trainable tensors, **every buffer** the method keeps (e.g. Diff Pruning's noise
counter), the runner's own random state and any bookkeeping a report needs; `load_state_dict`
restores it onto a freshly prepared model. The built-in loop (`train/loop.py`) and the Hugging Face
Trainer callback (`train/hf.py`) drive the same runners.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .. import seeds
from ..core import io
from ..core.adapters import add_delta, count_parameters, disabled, merge_and_unload, state_of, trainable_parameters
from ..core.config import DeltaConfig, SelectionReport
from ..core.delta import replace_data
from ..errors import UsageError

DEFAULT_HEAD_LR = 5e-3  # learning rate of a densely trained new head next to a sparse delta
TARGETING = ("target_modules", "exclude_modules", "parameter_kinds", "modules_to_save")


def as_flag(field_name: str) -> str:
    """A setting's command-line spelling (target_modules -> --target-modules)."""
    return "--" + field_name.replace("_", "-")


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


@dataclass
class MethodSettings:
    """What a runner is built from: the method, its budget and targeting, its options, learning rates."""

    method: str = field(default="sara", metadata={"help": "the method (see `sparsedelta methods`)"})
    task: str = field(default="classification", metadata={
        "help": "classification (a sequence classifier), causal-lm (next-token prediction) or sft (instruction "
                "tuning: the loss on the answers only)"})  # fmt: skip
    threshold: float | None = field(default=None, metadata={"help": "train entries with |θ| below it (SaRA's default 1e-3)"})  # fmt: skip
    density: float | None = field(default=None, metadata={"help": "train this fraction of the targeted entries instead"})  # fmt: skip
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "modules that get a delta: names or their last parts (default: the task's: every weight matrix "
        "outside a new head; a causal LM's attention and MLP projections)"})  # fmt: skip
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules that get no delta"})
    parameter_kinds: list[str] | None = field(default=None, metadata={
        "help": "weight bias embedding norm (default: weight; Diff Pruning: all)"})  # fmt: skip
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "trained densely (default: the new head)"})  # fmt: skip
    options: dict = field(default_factory=dict, metadata={"help": "method settings, e.g. rank_penalty=5e-3"})
    lr: float | None = field(default=None, metadata={"help": "learning rate (default: the method's for the task)"})
    head_lr: float | None = field(default=None, metadata={
        "help": f"learning rate of the densely trained head (default {DEFAULT_HEAD_LR:g} next to a delta, else --lr)"})  # fmt: skip
    seed: int = field(default=0, metadata={"help": "seed of the run (head, data order, the method's choices)"})


@dataclass
class Budget:
    trainable: int  # entries the optimizer updates (delta values + densely trained head)
    total: int  # entries of the base model
    selected: int | None = None  # delta entries
    eligible: int | None = None  # entries of the targeted tensors
    dense: int = 0  # entries of densely trained modules (the head), part of `trainable`

    @property
    def density(self) -> float:
        """Selected fraction of the targeted entries (for methods without a delta: trainable / total)."""
        if self.selected is not None and self.eligible:
            return self.selected / self.eligible
        return self.trainable / max(self.total, 1)


class MethodRunner:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for the command line's help
    config_class: ClassVar[type | None] = None  # its fields are the method's --option settings
    schedule_class: ClassVar[type | None] = None  # a dataclass of further settings that are not the config's
    takes_budget: ClassVar[bool] = False  # accepts --threshold / --density
    swaps_parameters: ClassVar[bool] = False  # changes its trainable tensors mid-run (a new phase)
    moves_entries: ClassVar[bool] = False  # moves delta entries to new positions mid-run, reading θ there (SpIEL)
    lrs: ClassVar[dict[str, float]] = {}  # default learning rate per task; "default" for the others
    default_options: ClassVar[dict[str, Any]] = {}  # --option defaults that differ from the option class's own
    # the targeting settings the method honours; any other one given is refused, never ignored
    targeting_flags: ClassVar[frozenset[str]] = frozenset(TARGETING)

    def __init__(self, settings: MethodSettings):
        self.settings = settings
        self.rng = seeds.method_rng(settings.seed)  # for any per-step random choice; saved in checkpoints
        self.params_changed = False
        self.folder: Path | None = None
        if settings.threshold is not None and settings.density is not None:
            raise UsageError("give --threshold or --density, not both")
        if not self.takes_budget and (settings.threshold is not None or settings.density is not None):
            raise UsageError(f"--method {self.name} has no sparse budget; drop --threshold/--density")
        ignored = [as_flag(f) for f in TARGETING if getattr(settings, f) is not None and f not in self.targeting_flags]
        if ignored:
            honoured = ", ".join(as_flag(f) for f in TARGETING if f in self.targeting_flags) or "none"
            raise UsageError(f"--method {self.name} cannot honour {', '.join(ignored)} (it takes: {honoured}); drop it")
        options = parse_options(self.name, self.option_classes(), settings.options, self.option_exclusions())
        self.schedule, self.options = None, options
        if self.schedule_class is not None:  # the settings that are not the config's
            names = {f.name for f in dataclasses.fields(self.schedule_class)}
            self.schedule = self.schedule_class(**{k: v for k, v in options.items() if k in names})
            self.options = {k: v for k, v in options.items() if k not in names}

    @classmethod
    def option_classes(cls) -> list[type]:
        """The dataclasses whose fields are the method's --option settings."""
        return [c for c in (cls.config_class, cls.schedule_class) if c is not None]

    @classmethod
    def option_exclusions(cls) -> set[str]:
        """Config fields set by their own flags rather than by --option."""
        return set()

    # -- hooks -------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, head_modules: list[str], total_steps: int, default_targets: dict | None = None):
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": self.lr}]

    def phase_starts(self, total_steps: int) -> list[int]:
        return [0]

    def before_step(self, model: nn.Module, step: int, loss_scale: float = 1.0) -> None:
        pass

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        return None

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def on_step(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> str | None:
        return None

    def finish(self, model: nn.Module) -> None:
        pass

    def report(self, model: nn.Module) -> dict | None:
        return None

    evaluates_before_phase = False  # the loop also validates just before each new phase starts

    def step_record(self, model: nn.Module) -> dict:
        """Numbers to log with each step (e.g. Diff Pruning's expected density in phase 1)."""
        return {}

    def resizes_parameters(self) -> bool:
        """Whether `on_step` may shrink the trainable tensors in place (SaRA's re-selection). The
        built-in loop follows that; DistributedDataParallel, fixed to the sizes it was built with, cannot."""
        return False

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        """The tensors the optimizer updates (for gradient averaging and clipping)."""
        return [p for g in self.param_groups(model) for p in g["params"]]

    # -- products ----------------------------------------------------------------------------------
    def save(self, model: nn.Module, tokenizer, folder: Path, card: dict | None = None) -> Path:
        """Write the product into `folder`; returns its path. `card`: sections of the model card that a
        runner writing a delta passes on to `sparsedelta.save` (data, metrics, ...); others may ignore it."""
        raise NotImplementedError

    def load(self, model: nn.Module, folder: Path) -> nn.Module:
        """Put a finished run's product (in `folder`) on its base model."""
        raise NotImplementedError

    def merged(self, model: nn.Module) -> nn.Module:
        """A plain model with the product folded in (from `load`'s result)."""
        raise NotImplementedError

    def disabled(self, model: nn.Module):
        """A context in which `model` (from `load`) computes its base model, or None when it cannot."""
        return None

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self, model: nn.Module) -> dict:
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        return {"trained": trained, "buffers": buffers, "rng": self.rng.getstate()}

    def load_state_dict(self, model: nn.Module, state: dict) -> None:
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        with torch.no_grad():
            for name, value in state["trained"].items():
                params[name].copy_(value)
            for name, value in state.get("buffers", {}).items():
                buffers[name].copy_(value)
        self.rng.setstate(state["rng"])

    # -- reports -----------------------------------------------------------------------------------
    def default_lr(self, task: str) -> float:
        return self.lrs.get(task, self.lrs.get("default", 1e-3))

    @property
    def lr(self) -> float:
        # instruction tuning trains a causal LM: the same learning rates as next-token prediction
        task = "causal-lm" if self.settings.task == "sft" else self.settings.task
        return self.settings.lr if self.settings.lr is not None else self.default_lr(task)

    @property
    def head_lr(self) -> float:
        return self.settings.head_lr if self.settings.head_lr is not None else self.lr

    def budget(self, model: nn.Module) -> Budget:
        total = sum(p.numel() for p in model.parameters())
        return Budget(sum(p.numel() for p in model.parameters() if p.requires_grad), total)

    def selection(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """Parameter path -> (selected entries, entries), for the density plot; empty without a delta."""
        return {}

    def describe(self) -> dict:
        return {"method": self.name, "lr": self.lr, "head_lr": self.head_lr}


def parse_options(method: str, classes: list[type], options: dict, exclude: set[str]) -> dict:
    """Check --option names against the fields of the method's dataclasses and convert the values to their types."""
    fields = {f.name: f for c in classes for f in dataclasses.fields(c) if f.name not in exclude and f.init}
    hints = {k: v for c in classes for k, v in typing.get_type_hints(c).items()}
    out = {}
    for key, value in options.items():
        if key not in fields:
            raise UsageError(
                f"--option {key}: not a setting of method {method!r}; its settings are {sorted(fields) or 'none'} "
                "(`sparsedelta methods` lists them with their meaning)"
            )
        out[key] = _convert(key, value, hints.get(key))
    return out


def _convert(key: str, value, hint):
    """JSON-parsed --option values: ints where floats are expected become floats; a type mismatch is an error."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None:
        if type(None) in allowed:
            return None
    elif float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif tuple in {typing.get_origin(a) or a for a in allowed} and isinstance(value, list):
        return tuple(value)
    elif any(isinstance(value, typing.get_origin(a) or a) for a in allowed if a is not typing.Any):
        if not (isinstance(value, bool) and bool not in allowed):
            return value
    names = " or ".join(getattr(a, "__name__", str(a)) for a in allowed)
    raise UsageError(f"--option {key}={value!r}: expected {names}")


def options_help(runner: type[MethodRunner]) -> list[tuple[str, Any, str]]:
    """(name, default, help) of each --option setting of a method."""
    rows, exclude = [], runner.option_exclusions()
    for cls in runner.option_classes():
        for f in dataclasses.fields(cls):
            if f.name in exclude or not f.init:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            default = runner.default_options.get(f.name, default)
            rows.append((f.name, default, help_of(f)))
    return rows


# -- sparse deltas ---------------------------------------------------------------------------------
def targeting_fields(
    settings: MethodSettings, head_modules: list[str], default_targets: dict | None, default_kinds: tuple[str, ...]
) -> dict:
    """DeltaConfig's targeting fields: the user's flags over the task's defaults; modules_to_save
    defaults to the new head."""
    s, defaults = settings, default_targets or {}
    saved = s.modules_to_save if s.modules_to_save is not None else (head_modules or None)
    return {
        "target_modules": s.target_modules if s.target_modules is not None else defaults.get("target_modules"),
        "exclude_modules": s.exclude_modules if s.exclude_modules is not None else defaults.get("exclude_modules"),
        "parameter_kinds": tuple(s.parameter_kinds or defaults.get("parameter_kinds") or default_kinds),
        "modules_to_save": saved or None,
    }


_DELTA_STATE = ("indices", "base", "values", "frozen_indices", "frozen_base", "frozen_values")


def active_adapter(model: nn.Module):
    state = state_of(model)
    return state.adapters[state.active]


class DeltaRunner(MethodRunner):
    """Any method whose product is a sparse delta chosen by a DeltaConfig."""

    config_class: ClassVar[type[DeltaConfig]] = DeltaConfig
    takes_budget = True
    default_parameter_kinds: ClassVar[tuple[str, ...]] = ("weight",)
    config: DeltaConfig

    @classmethod
    def option_exclusions(cls) -> set[str]:
        return {*TARGETING, "threshold", "density"}

    def targeting(self, head_modules: list[str], default_targets: dict | None = None) -> dict:
        return targeting_fields(self.settings, head_modules, default_targets, self.default_parameter_kinds)

    def budget_fields(self, model: nn.Module, targeting: dict) -> dict:
        return {}

    def prepare(self, model, head_modules, total_steps, default_targets=None):
        targeting = self.targeting(head_modules, default_targets)
        fields = {**targeting, **self.budget_fields(model, targeting), **self.options}
        try:
            self.config = self.config_class(**fields)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--method {self.name}: {e}") from e
        self.attach(model)
        return model

    def attach(self, model: nn.Module) -> None:
        add_delta(model, self.config)

    def param_groups(self, model):
        adapter = active_adapter(model)
        groups = [{"params": [d.values for d in adapter.deltas.values()], "lr": self.lr}]
        if adapter.saved:
            groups.append({"params": list(adapter.saved.values()), "lr": self.head_lr})
        return groups

    def trainable(self, model):
        return trainable_parameters(model)

    @property
    def head_lr(self) -> float:
        # a freshly initialised head needs a larger step than SaRA's rule gives the delta (BBC News with
        # MiniLM-L6: at 5e-3 the loss fell to 1.47 in 25 steps instead of 37 at 1e-3; 0.95 val. acc. at step 40)
        return self.settings.head_lr if self.settings.head_lr is not None else DEFAULT_HEAD_LR

    # -- products ----------------------------------------------------------------------------------
    def save(self, model, tokenizer, folder, card=None):
        return io.save(model, folder, card=card)

    def load(self, model, folder):
        return io.load(model, folder)

    def merged(self, model):
        return merge_and_unload(model, dequantize=True)  # a quantized base: the float model trained

    def disabled(self, model):
        return disabled(model)

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self, model):
        adapter = active_adapter(model)
        deltas = {
            path: {k: getattr(d, k).detach().clone() for k in _DELTA_STATE} for path, d in adapter.deltas.items()
        }
        saved = {path: p.detach().clone() for path, p in adapter.saved.items()}
        report = dataclasses.asdict(adapter.report) if adapter.report else None
        return {"deltas": deltas, "saved": saved, "report": report, "rng": self.rng.getstate()}

    def load_state_dict(self, model, state):
        adapter = active_adapter(model)
        with torch.no_grad():
            for path, delta in adapter.deltas.items():
                stored = state["deltas"][path]
                delta.unmerge()  # θ back at every position the delta touched, then the stored split
                for key in _DELTA_STATE:
                    value = stored[key].to(delta.indices.device, copy=True)
                    if key == "values":
                        replace_data(delta.values, value)
                    else:
                        setattr(delta, key, value)
                delta.merge()
            for path, param in adapter.saved.items():
                param.copy_(state["saved"][path])
        if state.get("report"):
            adapter.report = SelectionReport(**state["report"])
        self.rng.setstate(state["rng"])

    # -- reports -----------------------------------------------------------------------------------
    def budget(self, model):
        trainable, total = count_parameters(model)
        adapter = active_adapter(model)
        selected = sum(d.num_entries for d in adapter.deltas.values())
        eligible = adapter.report.eligible if adapter.report else sum(math.prod(d.shape) for d in adapter.deltas.values())
        dense = sum(p.numel() for p in adapter.saved.values())
        return Budget(trainable, total, selected, eligible, dense)

    def selection(self, model):
        return {p: (d.num_entries, math.prod(d.shape)) for p, d in active_adapter(model).deltas.items()}

    def describe(self):
        return {**super().describe(), "config": self.config.to_dict()}
