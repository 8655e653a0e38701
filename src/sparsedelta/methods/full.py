"""Ordinary fine-tuning of every parameter: the reference point of every comparison."""

from __future__ import annotations

from pathlib import Path

from ..core.quantized import refuse_full_training
from .base import MethodRunner
from .registry import register_method


@register_method
class FullRunner(MethodRunner):
    name = "full"
    targeting_flags = frozenset()  # every parameter trains
    summary = "reference: ordinary fine-tuning of every parameter"
    # the diffusion default (a 0.7 M-parameter UNet, 300 steps): validation loss 0.03000 at 5e-5, 0.02730 at 5e-4, 0.02682 at 2e-3
    lrs = {"default": 5e-5, "diffusion": 2e-3}

    def prepare(self, model, head_modules, total_steps, default_targets=None):
        refuse_full_training(model)  # packed int8/4-bit weights take no gradient step
        self.head_modules = head_modules
        model.requires_grad_(True)
        return model

    def param_groups(self, model):
        head = [p for n, p in model.named_parameters() if any(n.startswith(h + ".") for h in self.head_modules)]
        ids = {id(p) for p in head}
        body = [p for p in model.parameters() if id(p) not in ids]
        return [g for g in ({"params": body, "lr": self.lr}, {"params": head, "lr": self.head_lr}) if g["params"]]

    def save(self, model, tokenizer, folder, card=None):
        target = Path(folder) / "model"
        model.save_pretrained(target)
        if tokenizer is not None:  # a diffusion run's product is the UNet alone
            tokenizer.save_pretrained(target)
        return target

    def load(self, model, folder):
        return type(model).from_pretrained(Path(folder) / "model")

    def merged(self, model):
        return model
