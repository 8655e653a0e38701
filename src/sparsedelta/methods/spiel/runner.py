"""SpIEL's runner: the schedule of accumulation windows and re-selections inside any training loop
that calls `on_step` after each optimizer step (`sparsedelta train`, the Trainer callback)."""

from __future__ import annotations

from ...core.quantized import refuse_full_training
from ...errors import UsageError
from ..base import DeltaRunner, active_adapter
from ..baselines import sara_density, sara_lr
from ..registry import register_method
from ..sara import SaRARunner
from .config import SpIELConfig, replacements
from .growth import CandidateScores, drop_and_grow


@register_method
class SpIELRunner(DeltaRunner):
    """k entries at SaRA's budget (as the baselines), random (or |θ|-ranked) at first; every
    `reselection_steps` the entries that moved least go and the positions with the largest
    accumulated gradient come in."""

    name = "spiel"
    summary = "SpIEL (Ansell et al. 2024, arXiv 2401.16405): drop the entries that moved least, grow by accumulated gradients"
    config_class = SpIELConfig
    config: SpIELConfig
    moves_entries = True  # θ at a grown position is read from the weight: not under --fsdp (train/sharding.py)
    lrs = SaRARunner.lrs  # SaRA's learning rates, as the baselines at its budget

    def __init__(self, settings):
        super().__init__(settings)
        self.total_steps = 0
        self.next_selection = 0  # the step of the next re-selection
        self.window = False  # whether the deltas' observers are accumulating for it
        self.history: list[dict] = []  # one record per re-selection
        self.loss_scale = 1.0  # of the current step's backward (fp16), to unscale the candidates' gradients

    # A causal LM's rate: a fifth of SaRA's. At SaRA's 1e-2 SpIEL collapsed on the SFT study (exact match
    # 0.18 and 0.00 on two seeds; 2e-3: 0.57): growth picks the entries that read the few hidden dimensions
    # with outsized activations, where an Adam step moves the output most (RESULTS.md parts 4 and 5).
    lrs = {"causal-lm": 2e-3}

    def default_lr(self, task):
        return self.lrs.get(task) or sara_lr(self.settings, task)

    def budget_fields(self, model, targeting):  # SaRA's budget; --option seed=N overrides the run's seed
        return {"density": sara_density(self.settings, model, targeting), "seed": self.settings.seed}

    def prepare(self, model, head_modules, total_steps, default_targets=None):
        refuse_full_training(model, "SpIEL's growth (a grown entry starts from θ read out of the weight)")
        if not total_steps or total_steps < 1:
            raise UsageError("SpIEL needs the run's total number of optimizer steps (its schedule decays over them)")
        model = super().prepare(model, head_modules, total_steps, default_targets)
        self.total_steps = total_steps
        self.next_selection = self.config.selection_after(0)
        self._maybe_open(model, 0)
        return model

    # -- the schedule -----------------------------------------------------------------------------
    def _deltas(self, model):
        return active_adapter(model).deltas

    def _maybe_open(self, model, step: int) -> None:
        """Open the window of the next re-selection once `step` reaches A steps before it."""
        cfg, due = self.config, self.next_selection
        if self.window or due > cfg.horizon(self.total_steps) or step < due - cfg.accumulation_steps:
            return
        rate = cfg.rate(due, self.total_steps)
        for delta in self._deltas(model).values():
            n = replacements(len(delta.indices), rate)
            delta.grad_observer = CandidateScores(n * cfg.candidates_per_slot, delta) if n else None
        self.window = True

    def _close(self, model) -> None:
        for delta in self._deltas(model).values():
            delta.grad_observer = None
        self.window = False

    def before_step(self, model, step, loss_scale=1.0):
        self.loss_scale = loss_scale
        if self.window:
            for delta in self._deltas(model).values():
                if delta.grad_observer is not None:
                    delta.grad_observer.begin_step()

    def on_step(self, model, step, optimizer):
        if not self.window:
            self._maybe_open(model, step)
            return None
        deltas = self._deltas(model)
        for delta in deltas.values():
            if delta.grad_observer is not None:
                delta.grad_observer.end_step(self.loss_scale)
        if step < self.next_selection:
            return None
        # the first step taken at or after the due step (fp16 may skip the due one)
        rate = self.config.rate(self.next_selection, self.total_steps)
        replaced = total = 0
        for delta in deltas.values():
            k = len(delta.indices)
            total += k
            if delta.grad_observer is not None:
                replaced += drop_and_grow(delta, delta.grad_observer, replacements(k, rate), optimizer,
                                          self.config.grown_state)  # fmt: skip
        self._close(model)
        self.history.append({"step": step, "rate": rate, "replaced": replaced})
        self.next_selection = self.config.selection_after(step)
        self._maybe_open(model, step)
        return f"SpIEL: moved {replaced:,} of {total:,} entries ({replaced / max(total, 1):.2%}; rate {rate:.3f})"

    def finish(self, model):
        self._close(model)  # the product is the delta as it is; an open window has nothing to decide

    def report(self, model):
        return {"reselections": self.history}

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self, model):
        observers = {path: d.grad_observer.state() for path, d in self._deltas(model).items() if d.grad_observer}
        spiel = {"next_selection": self.next_selection, "window": self.window, "history": self.history,
                 "observers": observers}  # fmt: skip
        return {**super().state_dict(model), "spiel": spiel}

    def load_state_dict(self, model, state):
        super().load_state_dict(model, state)
        spiel = state["spiel"]
        self.next_selection, self.window = spiel["next_selection"], spiel["window"]
        self.history = list(spiel["history"])
        for path, delta in self._deltas(model).items():
            stored = spiel["observers"].get(path)
            delta.grad_observer = CandidateScores.from_state(stored, delta) if stored is not None else None
