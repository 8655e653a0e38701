"""SoRA's settings: which layers get a gated branch, and how the gates are sparsified."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ...errors import UsageError

GATE_GROUP = "sora_gates"  # name of the optimizer group that holds the gates
STATE_FILE = "sora_state.safetensors"
CONFIG_FILE = "sora_config.json"
FORMAT = "sparsedelta-sora"
FORMAT_VERSION = 1
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
THRESHOLD_MODES = ("proximal", "official")
GATE_INITS = ("normal", "ones")
GRIDS = ("linear", "log_linear", "exp_linear")
# Defaults per threshold mode, from the official DeBERTaV3-base scripts (lr 8e-4, sparse_lambda_2 3e-4,
# sparse_lambda 10); in "proximal" mode ξ is the threshold relative to the lr: 3e-4 / 8e-4 = 0.375.
DEFAULT_XI = {"proximal": 0.375, "official": 3e-4}
DEFAULT_L1_IN_LOSS = {"proximal": 0.0, "official": 10.0}



def _help(text: str, default=None, **kwargs):
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass
class SoRAConfig:
    """A SoRA adapter: which layers get a gated low-rank branch, and how the gates are sparsified."""

    r: int = _help("r_max, the rank of every branch before sparsification (official: 8 or 16)", 8)
    lora_alpha: float = _help("α: the branch is scaled by α / r (kept after pruning)", 16.0)
    lora_dropout: float = _help("dropout on the branch's input", 0.0)
    target_modules: list[str] | str | None = _help(
        "layers to adapt: a list matches a module name exactly or as its last part(s), a string is a regex "
        "that must match the whole name; None = every nn.Linear (and transformers Conv1D)"
    )
    exclude_modules: list[str] | str | None = _help("layers never adapted, same matching as target_modules")
    modules_to_save: list[str] | None = _help("modules trained densely and saved in full (e.g. a new head)")
    gate_init: str = _help("'normal': g ~ N(0, 1) as the official code; 'ones': g = 1", "normal")
    threshold: str = _help(
        "'proximal': after each step g ← T(g, lr·ξ), the paper; 'official': T(g, ξ) not scaled by the lr, "
        "plus l1_in_loss·mean|g| in the loss, as the official code",
        "proximal",
    )
    xi: float | None = _help(
        "ξ, the L1 strength (None: 0.375 in 'proximal' mode, 3e-4 in 'official' mode, both from the official "
        "DeBERTaV3 scripts at lr 8e-4)"
    )
    l1_in_loss: float | None = _help(
        "weight of mean|g| added to the loss (None: 10 in 'official' mode as the official scripts, 0 in 'proximal')"
    )
    gate_lr: float | None = _help("learning rate of the gates (None: the main learning rate)")
    schedule: list[float] | None = _help("ξ per sparsifying stage (strictly increasing); None: one stage at xi")
    seed: int | None = _help("seed of A's and g's initial values (None: torch's global generator)")

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise UsageError(f"r must be an integer >= 1, got {self.r!r}; the SoRA paper uses r = 8 or 16")
        if not (isinstance(self.lora_alpha, (int, float)) and math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise UsageError(f"lora_alpha must be a positive number, got {self.lora_alpha!r} (default 16)")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.gate_init not in GATE_INITS:
            raise UsageError(f"gate_init must be one of {list(GATE_INITS)}, got {self.gate_init!r}")
        if self.threshold not in THRESHOLD_MODES:
            raise UsageError(
                f"threshold must be 'proximal' (lr·ξ, the paper) or 'official' (fixed ξ, the official code), "
                f"got {self.threshold!r}"
            )
        if self.xi is None:
            self.xi = DEFAULT_XI[self.threshold]
        if self.l1_in_loss is None:
            self.l1_in_loss = DEFAULT_L1_IN_LOSS[self.threshold]
        _check_non_negative("xi", self.xi)
        _check_non_negative("l1_in_loss", self.l1_in_loss)
        if self.gate_lr is not None and not (
            isinstance(self.gate_lr, (int, float)) and math.isfinite(self.gate_lr) and self.gate_lr > 0
        ):
            raise UsageError(f"gate_lr must be > 0 or None (= the main learning rate), got {self.gate_lr!r}")
        if self.schedule is not None:
            self.schedule = check_schedule(self.schedule)
        for option in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, option)
            if isinstance(value, tuple):
                value = list(value)
                setattr(self, option, value)
            if value is not None and not isinstance(value, (str, list)):
                raise UsageError(f"{option} must be a list of names, a regex string or None, got {value!r}")
        if isinstance(self.modules_to_save, str):
            raise UsageError(f"modules_to_save must be a list of module names, got the string {self.modules_to_save!r}")

    def to_dict(self) -> dict:
        return {"method": "sora", **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict) -> SoRAConfig:
        data = {k: v for k, v in data.items() if k != "method"}
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(SoRAConfig)})
        if unknown:
            raise UsageError(
                f"unknown SoRA settings {unknown}; known: {[f.name for f in dataclasses.fields(SoRAConfig)]}"
            )
        return SoRAConfig(**data)


def _check_non_negative(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UsageError(f"{name} must be a finite number >= 0, got {value!r}")


def check_schedule(schedule) -> list[float]:
    """Return the stages' ξ as floats; refuse an empty, negative or not strictly increasing list."""
    values = [float(x) for x in schedule]
    if not values:
        raise UsageError("the sparsifying schedule is empty; give at least one ξ (e.g. xi_schedule('linear', ...))")
    for x in values:
        _check_non_negative("every ξ of the schedule", x)
    falls = [(a, b) for a, b in zip(values, values[1:]) if not b > a]
    if falls:
        raise UsageError(
            f"the sparsifying schedule must be strictly increasing (each stage raises ξ), but {falls[0][1]:g} "
            f"follows {falls[0][0]:g} in {values}"
        )
    return values


