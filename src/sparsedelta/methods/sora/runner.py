"""SoRA in a training loop: gated branches, the proximal step after each optimizer step, and the
sparsifying schedule's stages as phases of the one loop.

With `--option schedule=[ξ1, ξ2, ...]` the steps are split evenly into one stage per ξ; each stage
starts with a fresh optimizer and learning-rate schedule (warm-up, decay), and at its end the gates
are counted, the state is saved to `stages/stage-<i>/` of the run folder (load it with
`sora.load(base, folder)`) and the loop evaluates: the user picks the sparsity/accuracy trade-off
afterwards from `stages.json` (ξ, nonzero gates, validation metric per stage).
"""

from __future__ import annotations

import json
from pathlib import Path

from ...core.atomic import atomic_write
from ...core.quantized import refuse_full_training
from ...errors import UsageError
from ..base import Budget, MethodRunner
from ..registry import register_method
from .config import SoRAConfig
from .export import export_peft, merge
from .files import load, save
from .gates import gate_counts, l1_penalty, param_groups, proximal_step
from .layer import attach, config_of, disabled, layers, set_xi

STATE = "sora"  # the run folder's subfolder with the unpruned state
ADAPTER = "adapter"  # ... and the one with the pruned adapter as PEFT LoRA
STAGES = "stages"


@register_method
class SoRARunner(MethodRunner):
    name = "sora"
    targeting_flags = frozenset({"target_modules", "exclude_modules", "modules_to_save"})  # linear layers only
    summary = "SoRA (Ding et al., EMNLP 2023, arXiv 2311.11696): a gated LoRA whose rank sparsifies itself"
    config_class = SoRAConfig
    # measured on the default task (MiniLM-L6 + BBC News, 196 steps): see the README
    lrs = {"default": 1e-3, "causal-lm": 2e-3}
    head_default_lr = 5e-3  # a fresh head needs more than the branches (as next to a delta)

    @classmethod
    def option_exclusions(cls):
        return {"target_modules", "exclude_modules", "modules_to_save"}

    def __init__(self, settings):
        super().__init__(settings)
        self.swaps_parameters = bool(self.options.get("schedule") and len(self.options["schedule"]) > 1)
        self.stage, self.stages = 0, []

    def prepare(self, model, head_modules, total_steps, default_targets=None):
        refuse_full_training(model, "SoRA's gated branch (it replaces each targeted nn.Linear and merges into it)")
        s, defaults = self.settings, default_targets or {}
        saved = s.modules_to_save if s.modules_to_save is not None else (head_modules or None)
        try:
            self.config = SoRAConfig(
                target_modules=s.target_modules if s.target_modules is not None else defaults.get("target_modules"),
                exclude_modules=s.exclude_modules if s.exclude_modules is not None else defaults.get("exclude_modules"),
                modules_to_save=saved,
                **{"seed": s.seed, **self.options},
            )
        except (TypeError, ValueError) as e:
            raise UsageError(f"--method sora: {e}") from e
        self.xis = self.config.schedule or [self.config.xi]
        self.starts = [round(i * total_steps / len(self.xis)) for i in range(len(self.xis))]
        attach(model, self.config)
        set_xi(model, self.xis[0])
        return model

    @property
    def head_lr(self) -> float:
        return self.settings.head_lr if self.settings.head_lr is not None else self.head_default_lr

    def param_groups(self, model):
        return param_groups(model, self.lr, weight_decay=None, head_lr=self.head_lr)

    def phase_starts(self, total_steps):
        return self.starts

    def extra_loss(self, model, step):
        return l1_penalty(model) if config_of(model).l1_in_loss else None

    def after_optimizer_step(self, model, optimizer):
        proximal_step(model, optimizer)

    def on_step(self, model, step, optimizer):
        if self.stage + 1 < len(self.starts) and step >= self.starts[self.stage + 1]:  # first taken step from there
            event = self._end_stage(model, step)
            self.stage += 1
            set_xi(model, self.xis[self.stage])
            self.params_changed = True  # a fresh optimizer and lr schedule for the next stage
            return f"{event}; stage {self.stage} at ξ = {self.xis[self.stage]:g}"
        return None

    def finish(self, model):
        if len(self.xis) > 1:
            self._end_stage(model, None)

    def _end_stage(self, model, step) -> str:
        counts = gate_counts(model)
        record = {"stage": self.stage, "xi": self.xis[self.stage], "end_step": step,
                  "nonzero_gates": sum(counts.values()), "gates": counts}  # fmt: skip
        if self.folder is not None:
            record["checkpoint"] = str(Path(STAGES) / f"stage-{self.stage}")
            save(model, self.folder / record["checkpoint"])
            self.stages.append(record)
            text = json.dumps(self.stages, indent=2) + "\n"
            atomic_write(self.folder / STAGES / "stages.json", lambda tmp: tmp.write_text(text))
        total = self.config.r * len(counts)
        return f"stage {self.stage} (ξ = {self.xis[self.stage]:g}) ended with {record['nonzero_gates']:,} of {total:,} gates"

    # -- products ----------------------------------------------------------------------------------
    def save(self, model, tokenizer, folder, card=None):
        folder = Path(folder)
        save(model, folder / STATE)
        if any(gate_counts(model).values()):  # an adapter PEFT loads as it is: the pruned LoRA
            export_peft(model, folder / ADAPTER)
        return folder / STATE

    def load(self, model, folder):
        return load(model, Path(folder) / STATE)

    def merged(self, model):
        return merge(model)

    def disabled(self, model):
        return disabled(model)

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self, model):
        return {**super().state_dict(model), "stage": self.stage, "stages": self.stages}

    def load_state_dict(self, model, state):
        super().load_state_dict(model, state)
        self.stage, self.stages = state["stage"], state["stages"]
        set_xi(model, self.xis[self.stage])

    # -- reports -----------------------------------------------------------------------------------
    def budget(self, model):
        trainable = sum(p.numel() for g in self.param_groups(model) for p in g["params"])
        return Budget(trainable, sum(p.numel() for p in model.parameters()) - trainable)

    def report(self, model):
        """The rank each layer keeps after pruning (its nonzero gates), of r, and what that stores."""
        counts = gate_counts(model)
        shapes = {n: m.lora_A.shape[1] + m.lora_B.shape[0] for n, m in layers(model).items()}
        return {
            "r": self.config.r,
            "ranks": counts,
            "nonzero_gates": sum(counts.values()),
            "gates": self.config.r * len(counts),
            "pruned_lora_entries": sum(k * shapes[n] for n, k in counts.items()),
            "xi": self.xis[self.stage],
            "stages": self.stages,
        }

    def describe(self):
        return {**super().describe(), "config": self.config.to_dict()}

