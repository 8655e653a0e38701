"""Mixed precision for the training loop (`--precision fp32|bf16|fp16`).

The model's weights, the delta values, the optimizer state and a new head stay as they are (float32
for the loop's models); the forward runs under `torch.autocast` in bf16 or fp16, and so does the
backward, whose operations follow the forward's dtypes. fp16's narrow range needs the loss scaled
(`torch.amp.GradScaler`): a step whose gradients overflowed is skipped, and the runner's per-step
hooks must then not run, so `Precision.step` says whether the optimizer really stepped.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast and (for fp16) loss scaling for one run on `device`."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device_type, self.dtype = name, device.type, DTYPES[name]
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self):
        """The context the forward runs in (nothing for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self) -> float:
        """The factor the next backward's gradients carry (fp16's loss scale; 1 otherwise)."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale (before clipping them)."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """optimizer.step() unless fp16's gradients overflowed; True if it stepped."""
        if not self.scaler.is_enabled():
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before  # an overflow halves the scale and skips the step

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)
