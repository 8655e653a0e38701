"""PEFT's adapters as comparison methods (optional extra: `pip install sparsedelta[peft]`): LoRA,
SHiRA and Super-Tuning. Their --option settings are the fields of PEFT's own config classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..core.config import DeltaConfig
from ..core.targeting import find_targets
from ..errors import UsageError
from .base import DEFAULT_HEAD_LR, TARGETING, Budget, MethodRunner, targeting_fields
from .baselines import sara_density, sara_lr
from .registry import register_method

ADAPTER = "adapter"  # the run folder's subfolder holding the PEFT adapter


def _peft():
    try:
        import peft
    except ImportError as e:
        raise UsageError("this method needs PEFT: pip install 'sparsedelta[peft]'") from e
    return peft


class PeftRunner(MethodRunner):
    peft_config_name = ""
    targeting_flags = frozenset({"target_modules", "modules_to_save"})  # PEFT's layers, not parameter kinds

    @classmethod
    def option_classes(cls):
        return [getattr(_peft(), cls.peft_config_name)]

    @classmethod
    def option_exclusions(cls):
        # set by their own flags, or PEFT's bookkeeping rather than settings
        return {"target_modules", "modules_to_save", "peft_type", "auto_mapping", "peft_version",
                "base_model_name_or_path", "revision", "inference_mode", "task_type"}  # fmt: skip

    def defaults(self) -> dict[str, Any]:
        return dict(self.default_options)

    def prepare(self, model, head_modules, total_steps, default_targets=None):
        peft = _peft()
        s = self.settings
        saved = s.modules_to_save if s.modules_to_save is not None else head_modules
        targets = s.target_modules if s.target_modules is not None else (default_targets or {}).get("target_modules")
        if targets == ["all-linear"]:  # PEFT's own shorthand for every linear layer but the output head
            targets = "all-linear"
        self.base_total = sum(p.numel() for p in model.parameters())
        config_class = self.option_classes()[0]
        try:
            self.peft_config = config_class(target_modules=targets, modules_to_save=saved or None, **{**self.defaults(), **self.options})
            return peft.get_peft_model(model, self.peft_config)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--method {self.name}: {e}; name the layers with --target-modules") from e

    def budget(self, model):
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return Budget(trainable, self.base_total)

    def save(self, model, tokenizer, folder, card=None):  # PEFT writes its own README.md
        target = Path(folder) / ADAPTER
        model.save_pretrained(target)
        return target

    def load(self, model, folder):
        return _peft().PeftModel.from_pretrained(model, Path(folder) / ADAPTER)

    def merged(self, model):
        return model.merge_and_unload()

    def disabled(self, model):
        return model.disable_adapter()

    def describe(self):
        config = {k: v for k, v in self.peft_config.to_dict().items() if isinstance(v, (int, float, str, list, type(None)))}
        return {**super().describe(), "config": config}


@register_method
class LoRARunner(PeftRunner):
    """LoRA through PEFT: r = 8, α = 16, dropout 0.1 unless --option says otherwise."""

    name = "lora"
    targeting_flags = PeftRunner.targeting_flags | {"exclude_modules"}
    summary = "comparison: PEFT LoRA (r = 8, alpha 16, dropout 0.1)"
    peft_config_name = "LoraConfig"
    # the diffusion default: validation loss 0.03030 at 5e-4, 0.02877 at 2e-3, 0.02817 at 8e-3
    lrs = {"default": 5e-4, "diffusion": 8e-3}
    default_options = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}

    @classmethod
    def option_exclusions(cls):
        return super().option_exclusions() | {"exclude_modules"}  # set by --exclude-modules

    def defaults(self):
        excluded = self.settings.exclude_modules
        return {**super().defaults(), **({"exclude_modules": excluded} if excluded is not None else {})}


@register_method
class ShiraRunner(PeftRunner):
    """SHiRA through PEFT: a random sparse mask with r·(in + out) entries per layer (r = 8), on every
    linear layer unless --target-modules says otherwise."""

    name = "shira"
    summary = "comparison: PEFT SHiRA, r·(in + out) random entries per linear layer (r = 8)"
    peft_config_name = "ShiraConfig"
    lrs = {"default": 1e-3}

    default_options = {"r": 8}

    def defaults(self):
        return {**super().defaults(), "random_seed": self.settings.seed}

    def prepare(self, model, head_modules, total_steps, default_targets=None):
        if self.settings.target_modules is None:
            default_targets = {"target_modules": "all-linear"}
        return super().prepare(model, head_modules, total_steps, default_targets)


@register_method
class SupertuningRunner(PeftRunner):
    """Super-Tuning through PEFT (≥ 0.21) with `select_top=False`: in each targeted nn.Linear, the
    k = ⌊density·n⌋ entries of smallest |θ| are trained (PEFT's own per-layer torch.topk). That is
    SaRA's rule without its penalty and re-selection, per layer instead of one global threshold
    (PaFi's rule, arXiv 2305.16742). Budget, targets and learning rates are SaRA's: the density that
    SaRA's threshold (default 1e-3) selects on the same targets, or --density; the delta at SaRA's
    rule 1e-3·exp(−350·T), the new head at 5e-3. PEFT stores the positions in the adapter
    (`save_precomputed_indices=True`), so a reloaded run trains and evaluates on the very positions
    it was trained on, even where |θ| ties at the boundary."""

    name = "supertuning"
    targeting_flags = frozenset(TARGETING)  # SaRA's targeting; kinds other than linear weights refused by name
    summary = "comparison: PEFT Super-Tuning, the smallest |θ| per layer at SaRA's budget, no penalty (PaFi's rule)"
    peft_config_name = "SupertuningConfig"
    takes_budget = True
    default_options = {"select_top": False}
    VALUES = "supertuning_values"

    @classmethod
    def option_exclusions(cls):
        # the budget comes from --threshold/--density; the positions must be stored; no LoRA hybrid ("Supra")
        return super().option_exclusions() | {"sparsity", "save_precomputed_indices", "init_weights", "r",
                                              "lora_alpha", "lora_dropout"}  # fmt: skip

    def default_lr(self, task):
        return sara_lr(self.settings, task)

    @property
    def head_lr(self):
        return self.settings.head_lr if self.settings.head_lr is not None else DEFAULT_HEAD_LR

    def prepare(self, model, head_modules, total_steps, default_targets=None):
        peft = _peft()
        targeting = targeting_fields(self.settings, head_modules, default_targets, ("weight",))
        layers = _linear_layers(model, targeting)
        self.density = sara_density(self.settings, model, targeting)
        self.eligible = sum(model.get_submodule(n).weight.numel() for n in layers)
        self.base_total = sum(p.numel() for p in model.parameters())
        settings = {**self.defaults(), **self.options}
        try:  # full module names: PEFT adapts exactly the layers SaRA's targeting chose
            self.peft_config = peft.SupertuningConfig(target_modules=layers, modules_to_save=targeting["modules_to_save"],
                                                      sparsity=1 - self.density, save_precomputed_indices=True,
                                                      **settings)  # fmt: skip
            adapted = peft.get_peft_model(model, self.peft_config)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--method {self.name}: {e}") from e
        if sorted(self.selection(adapted)) != sorted(f"{n}.weight" for n in layers):
            raise UsageError(f"--method {self.name}: PEFT adapted other layers than the targeted {layers}")
        return adapted

    def param_groups(self, model):
        values = [p for n, p in model.named_parameters() if p.requires_grad and self.VALUES in n]
        rest = [p for n, p in model.named_parameters() if p.requires_grad and self.VALUES not in n]
        return [{"params": values, "lr": self.lr}] + ([{"params": rest, "lr": self.head_lr}] if rest else [])

    def budget(self, model):
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        selected = sum(k for k, _ in self.selection(model).values())
        return Budget(trainable, self.base_total, selected, self.eligible, trainable - selected)

    def selection(self, model):
        prefix = "base_model.model."
        return {
            f"{name.removeprefix(prefix)}.weight": (sum(v.numel() for v in layer.supertuning_values.values()),
                                                    layer.get_base_layer().weight.numel())
            for name, layer in model.named_modules() if hasattr(layer, self.VALUES)
        }  # fmt: skip

    def describe(self):
        return {**super().describe(), "density": self.density}


def _linear_layers(model: nn.Module, targeting: dict) -> list[str]:
    """Module names of SaRA's targets for these flags; Super-Tuning adapts nn.Linear weights only."""
    try:
        targets, _ = find_targets(model, DeltaConfig(**targeting))
    except ValueError as e:
        raise UsageError(f"--method supertuning: {e}") from e
    layers, refused = [], []
    for path, target in targets.items():
        module, pname = target.owners[0]
        if isinstance(module, nn.Linear) and pname == "weight" and len(target.owners) == 1:
            layers.append(path.rpartition(".")[0])
        else:
            refused.append(f"{path} ({type(module).__name__}.{pname})")
    if refused:
        raise UsageError(
            f"--method supertuning adapts nn.Linear weights only; the targets include {', '.join(refused[:5])}"
            + (f" and {len(refused) - 5} more" if len(refused) > 5 else "")
            + "; narrow them with --target-modules / --exclude-modules / --parameter-kinds weight"
        )
    return layers
