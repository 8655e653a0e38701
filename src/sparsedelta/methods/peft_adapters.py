"""PEFT's adapters as comparison methods (optional extra: `pip install sparsedelta[peft]`).
Their --option settings are the fields of PEFT's own config classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UsageError
from .base import Budget, MethodRunner
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

    @classmethod
    def option_classes(cls):
        return [getattr(_peft(), cls.peft_config_name)]

    @classmethod
    def option_exclusions(cls):
        # set by their own flags, or PEFT's bookkeeping rather than settings
        return {"target_modules", "modules_to_save", "peft_type", "auto_mapping", "peft_version",
                "base_model_name_or_path", "revision", "inference_mode", "task_type"}  # fmt: skip

    def defaults(self) -> dict[str, Any]:
        return {}

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

    def save(self, model, tokenizer, folder):
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
    summary = "comparison: PEFT LoRA (r = 8, alpha 16, dropout 0.1)"
    peft_config_name = "LoraConfig"
    lrs = {"default": 5e-4}

    def defaults(self):
        return {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}


@register_method
class ShiraRunner(PeftRunner):
    """SHiRA through PEFT: a random sparse mask with r·(in + out) entries per layer (r = 8), on every
    linear layer unless --target-modules says otherwise."""

    name = "shira"
    summary = "comparison: PEFT SHiRA, r·(in + out) random entries per linear layer (r = 8)"
    peft_config_name = "ShiraConfig"
    lrs = {"default": 1e-3}

    def defaults(self):
        return {"r": 8, "random_seed": self.settings.seed}

    def prepare(self, model, head_modules, total_steps, default_targets=None):
        if self.settings.target_modules is None:
            default_targets = {"target_modules": "all-linear"}
        return super().prepare(model, head_modules, total_steps, default_targets)
