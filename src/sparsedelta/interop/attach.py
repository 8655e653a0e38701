"""A delta attached to the caller's model only while an export or import needs it.

Export loads the delta onto the base (which checks the fingerprint and gives the merged tensors
and the owning modules); import attaches the read positions and values to save them with a normal
fingerprint. Either way the model is handed back as it came: without sparsedelta parts if it had
none (bit-exact, `unload`), else with its own adapters and the same one active.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from torch import nn

from ..core.adapters import Adapter, DeltaState, delete_adapter, set_adapter, state_of, unload


@contextlib.contextmanager
def temporarily(model: nn.Module, attach: Callable[[str], object], name: str = "interop"):
    """Run `attach(adapter_name)`, yield (state, adapter), then remove that adapter again."""
    prior: DeltaState | None = getattr(model, "_sparsedelta", None)
    active = prior.active if prior is not None else None
    taken = set(prior.adapters) if prior is not None else set()
    while name in taken:
        name += "_"
    attach(name)
    try:
        state = state_of(model)
        adapter: Adapter = state.adapters[name]
        yield state, adapter, name
    finally:
        if prior is None:
            unload(model)
        elif name in prior.adapters:
            delete_adapter(model, name)
            set_adapter(model, active)
