"""What a training loop needs from each method, as one small class per method and a table by name.

A runner's hooks, in the order a loop calls them:
    prepare(model, head_modules, total_steps)   attach the delta (or adapter); freeze the rest
    param_groups(model)                         optimizer groups, each with its own lr
    phase_starts(total_steps)                   steps where the lr schedule starts afresh (default [0])
    extra_loss(model, step)                     a term added to the task loss (e.g. SaRA's nuclear norm)
    on_step(model, step, optimizer)             schedules after each optimizer step (e.g. re-selection);
                                                set params_changed = True after swapping the trainable
                                                tensors (a new phase) and the loop builds a new AdamW
    finish(model)                               anything after the last step
    save(model, tokenizer, folder)              the run's product
plus state_dict/load_state_dict for checkpoints and budget/selection for reports. Both the built-in
loop (`training.py`) and the Hugging Face Trainer callback (`hf.py`) drive the same runners, so a new
method costs one class and one line in RUNNERS.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core import io
from ..core.adapters import add_delta, count_parameters, state_of, trainable_parameters
from ..core.config import DeltaConfig
from ..core.delta import replace_data
from ..core.targeting import find_targets
from ..errors import UsageError
from ..methods import DiffPruningConfig, MagnitudeConfig, RandomConfig, SaRAConfig
from ..methods import diff_pruning as dp
from ..methods.sara import rank_penalty, reselect

if TYPE_CHECKING:
    from .loop import TrainConfig

DEFAULT_THRESHOLD = 1e-3  # SaRA's threshold when no budget is given; also sets the baselines' budget
DEFAULT_HEAD_LR = 5e-3  # learning rate of a densely trained new head next to a sparse delta


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
    name = ""
    default_lr = 1e-3
    params_changed = False  # set by on_step after swapping the trainable tensors: the loop rebuilds AdamW

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)  # for any per-step random choice; saved in checkpoints

    # -- hooks -------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, head_modules: list[str], total_steps: int) -> nn.Module:
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> list[dict]:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.lr}]

    def phase_starts(self, total_steps: int) -> list[int]:
        """Steps where the learning-rate schedule starts afresh (its warm-up and decay per phase)."""
        return [0]

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        return None

    def on_step(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> str | None:
        return None

    def finish(self, model: nn.Module) -> None:
        pass

    def save(self, model: nn.Module, tokenizer, folder: Path) -> Path:
        raise NotImplementedError

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self, model: nn.Module) -> dict:
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return {"trained": trained, "rng": self.rng.getstate()}

    def load_state_dict(self, model: nn.Module, state: dict) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["trained"].items():
                params[name].copy_(value)
        self.rng.setstate(state["rng"])

    # -- reports -----------------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return self.cfg.lr if self.cfg.lr is not None else self.default_lr

    @property
    def head_lr(self) -> float:
        return self.cfg.head_lr if self.cfg.head_lr is not None else self.lr

    def budget(self, model: nn.Module) -> Budget:
        total = sum(p.numel() for p in model.parameters())
        return Budget(sum(p.numel() for p in model.parameters() if p.requires_grad), total)

    def selection(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """Parameter path -> (selected entries, entries), for the density plot; empty without a delta."""
        return {}

    def describe(self) -> dict:
        return {"method": self.name, "lr": self.lr, "head_lr": self.head_lr}

    def _check_options(self, allowed: set[str]) -> dict:
        unknown = sorted(set(self.cfg.options) - allowed)
        if unknown:
            raise UsageError(
                f"--option {unknown[0]}: not a setting of method {self.name!r}; its settings are {sorted(allowed)}"
            )
        return dict(self.cfg.options)


# -- sparse deltas ---------------------------------------------------------------------------------
class DeltaRunner(MethodRunner):
    """Any method whose product is a sparse delta chosen by a DeltaConfig."""

    config_class: type[DeltaConfig] = DeltaConfig
    config: DeltaConfig

    def targeting(self, head_modules: list[str]) -> dict:
        cfg = self.cfg
        saved = cfg.modules_to_save if cfg.modules_to_save is not None else (head_modules or None)
        return {
            "target_modules": cfg.target_modules,
            "exclude_modules": cfg.exclude_modules,
            "parameter_kinds": tuple(cfg.parameter_kinds or ("weight",)),
            "modules_to_save": saved or None,
        }

    def budget_fields(self, model: nn.Module, targeting: dict) -> dict:
        return {}

    def prepare(self, model, head_modules, total_steps):
        targeting = self.targeting(head_modules)
        # budget and targeting have their own flags; every other field of the method's config is an --option
        fields = {f.name for f in dataclasses.fields(self.config_class)} - set(targeting) - {"threshold", "density"}
        options = self._check_options(fields)
        self.config = self.config_class(**{**targeting, **self.budget_fields(model, targeting), **options})
        self.attach(model)
        return model

    def attach(self, model: nn.Module) -> None:
        add_delta(model, self.config)

    def param_groups(self, model):
        adapter = _adapter(model)
        groups = [{"params": [d.values for d in adapter.deltas.values()], "lr": self.lr}]
        if adapter.saved:
            groups.append({"params": list(adapter.saved.values()), "lr": self.head_lr})
        return groups

    @property
    def head_lr(self) -> float:
        # a freshly initialised head needs a larger step than SaRA's rule gives the delta (BBC News with
        # MiniLM-L6: at 5e-3 the loss fell to 1.47 in 25 steps instead of 37 at 1e-3; 0.95 val. acc. at step 40)
        return self.cfg.head_lr if self.cfg.head_lr is not None else DEFAULT_HEAD_LR

    def save(self, model, tokenizer, folder):
        return io.save(model, folder)

    def state_dict(self, model):
        adapter = _adapter(model)
        deltas = {
            path: {k: getattr(d, k).detach().clone() for k in _DELTA_STATE} for path, d in adapter.deltas.items()
        }
        saved = {path: p.detach().clone() for path, p in adapter.saved.items()}
        return {"deltas": deltas, "saved": saved, "rng": self.rng.getstate()}

    def load_state_dict(self, model, state):
        adapter = _adapter(model)
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
        self.rng.setstate(state["rng"])

    def budget(self, model):
        trainable, total = count_parameters(model)
        adapter = _adapter(model)
        selected = sum(d.num_entries for d in adapter.deltas.values())
        eligible = adapter.report.eligible if adapter.report else sum(math.prod(d.shape) for d in adapter.deltas.values())
        dense = sum(p.numel() for p in adapter.saved.values())
        return Budget(trainable, total, selected, eligible, dense)

    def selection(self, model):
        return {p: (d.num_entries, math.prod(d.shape)) for p, d in _adapter(model).deltas.items()}

    def describe(self):
        return {**super().describe(), "config": self.config.to_dict()}


_DELTA_STATE = ("indices", "base", "values", "frozen_indices", "frozen_base", "frozen_values")


def _adapter(model: nn.Module):
    state = state_of(model)
    return state.adapters[state.active]


class SaRARunner(DeltaRunner):
    """SaRA: train the smallest |θ|; nuclear-norm penalty in the loss; optional one-off re-selection."""

    name = "sara"
    config_class = SaRAConfig
    config: SaRAConfig

    def budget_fields(self, model, targeting):
        return {"threshold": self.cfg.threshold, "density": self.cfg.density}

    @property
    def default_lr(self) -> float:
        return self.config.default_lr if hasattr(self, "config") else SaRAConfig(threshold=self.cfg.threshold).default_lr

    def extra_loss(self, model, step):
        if self.config.rank_penalty == 0:
            return None
        return rank_penalty(model, self.config.rank_penalty, self.config.rank_penalty_scope, self.rng)

    def on_step(self, model, step, optimizer):
        if self.config.reselect_step is None or step != self.config.reselect_step:
            return None
        threshold = self.config.threshold
        if threshold is None:  # a density budget: the equivalent threshold is the largest selected |θ|
            threshold = max(float(d.base.abs().max()) for d in _adapter(model).deltas.values() if len(d.base))
            threshold = math.nextafter(threshold, math.inf)
        return str(reselect(model, threshold, optimizer))


class _BaselineRunner(DeltaRunner):
    """Random or largest-|θ| positions at SaRA's budget: the given density, or the density that
    SaRA's threshold would select on the same targets."""

    def budget_fields(self, model, targeting):
        if self.cfg.density is not None:
            return {"density": self.cfg.density}
        threshold = self.cfg.threshold if self.cfg.threshold is not None else DEFAULT_THRESHOLD
        return {"density": density_below(model, targeting, threshold)}

    @property
    def default_lr(self) -> float:
        return SaRAConfig(threshold=self.cfg.threshold, density=self.cfg.density).default_lr


class RandomRunner(_BaselineRunner):
    name = "random"
    config_class = RandomConfig

    def budget_fields(self, model, targeting):
        return {**super().budget_fields(model, targeting), "seed": self.cfg.seed}  # --option seed=N overrides


class MagnitudeRunner(_BaselineRunner):
    name = "magnitude"
    config_class = MagnitudeConfig


def density_below(model: nn.Module, targeting: dict, threshold: float) -> float:
    """The fraction of the targeted entries with |θ| < threshold."""
    targets, _ = find_targets(model, DeltaConfig(**targeting))
    below = sum(int((t.param.detach().abs() < threshold).sum()) for t in targets.values())
    eligible = sum(t.param.numel() for t in targets.values())
    if below == 0:
        raise UsageError(f"--threshold {threshold:g} selects no entry; raise it or pass --density")
    return below / eligible


# -- ordinary fine-tuning and LoRA -----------------------------------------------------------------
class FullRunner(MethodRunner):
    """Ordinary fine-tuning of every parameter (the reference point)."""

    name = "full"
    default_lr = 5e-5

    def prepare(self, model, head_modules, total_steps):
        self._check_options(set())
        self.head_modules = head_modules
        model.requires_grad_(True)
        return model

    def param_groups(self, model):
        head = [p for n, p in model.named_parameters() if any(n.startswith(h + ".") for h in self.head_modules)]
        ids = {id(p) for p in head}
        body = [p for p in model.parameters() if id(p) not in ids]
        return [g for g in ({"params": body, "lr": self.lr}, {"params": head, "lr": self.head_lr}) if g["params"]]

    def save(self, model, tokenizer, folder):
        target = Path(folder) / "model"
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        return target


class PeftRunner(MethodRunner):
    """A PEFT adapter (optional extra: `pip install sparsedelta[peft]`), for comparison."""

    defaults: dict[str, Any] = {}

    def peft_config_class(self):
        raise NotImplementedError

    def prepare(self, model, head_modules, total_steps):
        try:
            from peft import get_peft_model

            config_class = self.peft_config_class()
        except ImportError as e:
            raise UsageError(f"--method {self.name} needs PEFT: pip install 'sparsedelta[peft]'") from e
        allowed = {f.name for f in dataclasses.fields(config_class)} - {"target_modules", "modules_to_save"}
        options: dict[str, Any] = {**self.defaults, **self._check_options(allowed)}
        saved = self.cfg.modules_to_save if self.cfg.modules_to_save is not None else head_modules
        targets = self.cfg.target_modules
        if targets == ["all-linear"]:  # PEFT's own shorthand for every linear layer but the output head
            targets = "all-linear"
        self.base_total = sum(p.numel() for p in model.parameters())
        self.peft_config = config_class(target_modules=targets, modules_to_save=saved or None, **options)
        try:
            return get_peft_model(model, self.peft_config)
        except ValueError as e:
            raise UsageError(f"--method {self.name}: {e}; name the layers with --target-modules") from e

    def budget(self, model):
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return Budget(trainable, self.base_total)

    def save(self, model, tokenizer, folder):
        target = Path(folder) / "adapter"
        model.save_pretrained(target)
        return target

    def describe(self):
        config = {k: v for k, v in self.peft_config.to_dict().items() if isinstance(v, (int, float, str, list, type(None)))}
        return {**super().describe(), "config": config}


class LoRARunner(PeftRunner):
    """LoRA through PEFT: r = 8, α = 16, dropout 0.1 unless --option says otherwise."""

    name = "lora"
    default_lr = 5e-4
    defaults = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}

    def peft_config_class(self):
        from peft import LoraConfig

        return LoraConfig


class ShiraRunner(PeftRunner):
    """SHiRA through PEFT: a random sparse mask with r·(in + out) entries per layer (r = 8), on every
    linear layer unless --target-modules says otherwise."""

    name = "shira"
    default_lr = 1e-3

    def peft_config_class(self):
        from peft import ShiraConfig

        return ShiraConfig

    @property
    def defaults(self) -> dict[str, Any]:
        return {"r": 8, "random_seed": self.cfg.seed}

    def prepare(self, model, head_modules, total_steps):
        if self.cfg.target_modules is None:
            self.cfg = dataclasses.replace(self.cfg, target_modules=["all-linear"])
        return super().prepare(model, head_modules, total_steps)


class DiffPruningRunner(DeltaRunner):
    """Diff Pruning: the dense Hard-Concrete L0 phase for the first `phase1_fraction` (default 0.3) of
    the steps, then projection to the budget (--density, default 0.5%) and fixed-mask fine-tuning as an
    ordinary delta, with a learning-rate schedule of its own. Learning rates: w at --lr (default 2e-4:
    the paper's 1e-5 barely moves w in a few hundred CPU steps), the phase-2 values at 5 × that (the
    paper's 1e-5 -> 5e-5 ratio), α at 0.1 (paper), the new head at --head-lr. Measured on the default
    task (BBC News, 196 steps): w 1e-4, half the steps in phase 1, phase 2 on the tail of one schedule
    gave 0.946 test accuracy; its own schedule 0.960; w 2e-4 with phase 1 at 30% 0.9685 (SaRA's default
    0.9685). The projection to 0.5% is the bottleneck: in a few hundred steps the L0 term cannot thin
    the diff much, so most of phase 1's change is cut and phase 2 needs the steps to recover.
    Options: every field of DiffPruningConfig (e.g. --option structured=true, l0_penalty=1.25e-7) and
    phase1_fraction."""

    name = "diff-pruning"
    config_class = DiffPruningConfig
    config: DiffPruningConfig
    default_lr = 2e-4
    phase2_lr_factor = 5
    phase1_fraction = 0.3
    alpha_lr = dp.PAPER_LR_ALPHA

    def targeting(self, head_modules):
        targeting = super().targeting(head_modules)
        if self.cfg.parameter_kinds is None:  # the paper gives every parameter a diff
            targeting["parameter_kinds"] = DiffPruningConfig.parameter_kinds
        return targeting

    def budget_fields(self, model, targeting):
        if self.cfg.threshold is not None:
            raise UsageError("--method diff-pruning learns its positions: give --density (the projection budget), not --threshold")
        return {"density": self.cfg.density} if self.cfg.density is not None else {}

    def prepare(self, model, head_modules, total_steps):
        options = dict(self.cfg.options)
        fraction = float(options.pop("phase1_fraction", self.phase1_fraction))
        if not 0 < fraction < 1:
            raise UsageError(f"--option phase1_fraction={fraction}: must lie strictly between 0 and 1")
        self.cfg = dataclasses.replace(self.cfg, options=options)
        self.project_step = max(1, min(total_steps - 1, round(fraction * total_steps)))
        return super().prepare(model, head_modules, total_steps)

    def attach(self, model):
        dp.start(model, self.config)

    def phase_starts(self, total_steps):
        return [0, self.project_step]  # phase 2 trains new tensors: its own warm-up and decay

    @staticmethod
    def in_phase_one(model) -> bool:
        return getattr(model, "_diff_pruning", None) is not None

    def param_groups(self, model):
        if self.in_phase_one(model):
            return dp.param_groups(model, lr_w=self.lr, lr_alpha=self.alpha_lr, lr_head=self.head_lr)
        groups = super().param_groups(model)
        groups[0]["lr"] = self.phase2_lr_factor * self.lr
        return groups

    def extra_loss(self, model, step):
        return dp.penalty(model) if self.in_phase_one(model) else None

    def on_step(self, model, step, optimizer):
        if step != self.project_step or not self.in_phase_one(model):
            return None
        dp.project(model)
        self.params_changed = True
        return str(_adapter(model).report)

    def state_dict(self, model):
        return MethodRunner.state_dict(self, model) if self.in_phase_one(model) else super().state_dict(model)

    def load_state_dict(self, model, state):
        if "deltas" not in state:  # still in phase 1
            return MethodRunner.load_state_dict(self, model, state)
        dp.discard(model)  # resumed in phase 2: rebuild the projected delta from the checkpoint
        positions = {path: d["indices"] for path, d in state["deltas"].items()}
        add_delta(model, self.config, positions)
        super().load_state_dict(model, state)

    def budget(self, model):
        if not self.in_phase_one(model):
            return super().budget(model)
        groups = dp.param_groups(model)
        trainable = sum(p.numel() for g in groups for p in g["params"])
        diff = sum(p.numel() for g in groups if g["name"] in ("w", "alpha") for p in g["params"])
        targeted = dp.num_targeted(model)  # phase 1: every targeted entry has a diff (w) and a logit (α)
        return Budget(trainable, sum(p.numel() for p in model.parameters()) - diff, targeted, targeted)

    def selection(self, model):
        return {} if self.in_phase_one(model) else super().selection(model)


RUNNERS: dict[str, type[MethodRunner]] = {
    "sara": SaRARunner,
    "diff-pruning": DiffPruningRunner,
    "random": RandomRunner,
    "magnitude": MagnitudeRunner,
    "full": FullRunner,
    "lora": LoRARunner,
    "shira": ShiraRunner,
}
# Methods with a name reserved on the command line but no runner yet, and why.
UNAVAILABLE: dict[str, str] = {}


def method_names() -> list[str]:
    return list(RUNNERS) + list(UNAVAILABLE)


def make_runner(cfg: TrainConfig) -> MethodRunner:
    if cfg.method in UNAVAILABLE:
        raise UsageError(f"--method {cfg.method}: {UNAVAILABLE[cfg.method]}; available now: {', '.join(RUNNERS)}")
    if cfg.method not in RUNNERS:
        raise UsageError(f"unknown method {cfg.method!r}; choose one of: {', '.join(RUNNERS)}")
    if cfg.threshold is not None and cfg.density is not None:
        raise UsageError("give --threshold or --density, not both")
    if cfg.method in ("full", "lora", "shira") and (cfg.threshold is not None or cfg.density is not None):
        raise UsageError(f"--method {cfg.method} has no sparse budget; drop --threshold/--density")
    return RUNNERS[cfg.method](cfg)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The tensors the optimizer updates, whatever the method (for gradient averaging and clipping)."""
    if getattr(model, "_sparsedelta", None) is not None:
        return trainable_parameters(model)
    return [p for p in model.parameters() if p.requires_grad]
