"""One way to change what a module's forward computes: named layers around the original forward.

Every method that must see a module's call (the core's deltas, Diff Pruning's phase 1, mixed-task
batches) adds a *layer*: a callable `layer(module, inner, *args, **kwargs)`, where `inner(*args,
**kwargs)` runs the next layer down and, at the bottom, the module's own forward. Layers stack in the
order they are added and come off in any order; the module's forward is restored when the last
one goes. The verbs are symmetric, as torch's prune module has them:

    wrap(module, "sparsedelta", layer)      is_wrapped(module, "sparsedelta")      unwrap(module, "sparsedelta")

A layer may replace the whole call by a faster autograd function (`fast_path`) when nothing but the
module's class forward lies below it (`inner.plain`): a user-patched or subclassed forward is always
called as it is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..errors import UsageError

PATCH = "_sparsedelta_patch"  # instance attribute holding a module's layers


@dataclass(frozen=True)
class FastPath:
    """How a layer type computes its output from `weight`, so a method can supply its own gradient."""

    kind: str  # "linear" (y = x Wᵀ + b), "embedding" (a row lookup) or "conv" (F.conv1d/2d/3d)
    transposed: bool = False  # linear with W stored (in, out): transformers' Conv1D, y = x W + b
    quantized: bool = False  # a bitsandbytes layer: W packed, read-only; a delta's effect is only ever added


# Exact types only (a subclass may compute something else), by qualified name so that the core needs
# no import of transformers.
FAST_PATHS: dict[str, FastPath] = {
    "torch.nn.modules.linear.Linear": FastPath("linear"),
    "transformers.pytorch_utils.Conv1D": FastPath("linear", transposed=True),
    "torch.nn.modules.sparse.Embedding": FastPath("embedding"),
    "torch.nn.modules.conv.Conv1d": FastPath("conv"),
    "torch.nn.modules.conv.Conv2d": FastPath("conv"),
    "torch.nn.modules.conv.Conv3d": FastPath("conv"),
    "bitsandbytes.nn.modules.Linear8bitLt": FastPath("linear", quantized=True),
    "bitsandbytes.nn.modules.Linear4bit": FastPath("linear", quantized=True),
    "bitsandbytes.nn.modules.LinearNF4": FastPath("linear", quantized=True),
    "bitsandbytes.nn.modules.LinearFP4": FastPath("linear", quantized=True),
}


def fast_path(module: nn.Module) -> FastPath | None:
    """The fast path for this module's `weight`, or None. Embeddings that renormalise their table
    (max_norm), scale gradients by frequency or want sparse gradients, and convolutions that pad
    other than with zeros (reflect, replicate, circular) take the generic path."""
    kind = type(module)
    path = FAST_PATHS.get(f"{kind.__module__}.{kind.__qualname__}")
    if path is not None and path.kind == "embedding":
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            return None
    if path is not None and path.kind == "conv" and module.padding_mode != "zeros":
        return None
    return path


Layer = Callable[..., object]


@dataclass
class _Patch:
    own_forward: Callable | None  # an instance-level forward the module had before (None: its class's)
    layers: list[tuple[str, Layer]] = field(default_factory=list)  # innermost first


class Inner:
    """What a layer calls to run everything below it. `plain`: below it is only the class's forward."""

    __slots__ = ("module", "patch", "depth")

    def __init__(self, module: nn.Module, patch: _Patch, depth: int):
        self.module, self.patch, self.depth = module, patch, depth

    @property
    def plain(self) -> bool:
        return self.depth == 0 and self.patch.own_forward is None

    def plain_but(self, *keys: str) -> bool:
        """Whether below it lies only the class's forward and layers under `keys` (layers the
        caller knows to pass the call through unchanged)."""
        return self.patch.own_forward is None and all(k in keys for k, _ in self.patch.layers[: self.depth])

    def __call__(self, *args, **kwargs):
        return _run(self.module, self.patch, self.depth, args, kwargs)


def _run(module: nn.Module, patch: _Patch, depth: int, args, kwargs):
    if depth == 0:
        forward = patch.own_forward or type(module).forward.__get__(module)
        return forward(*args, **kwargs)
    _, layer = patch.layers[depth - 1]
    return layer(module, Inner(module, patch, depth - 1), *args, **kwargs)


def _patched_forward(self: nn.Module, *args, **kwargs):
    patch = self.__dict__[PATCH]
    return _run(self, patch, len(patch.layers), args, kwargs)


def wrap(module: nn.Module, key: str, layer: Layer) -> None:
    """Add `layer` (outermost) to the module's forward under `key`; one layer per key."""
    patch = module.__dict__.get(PATCH)
    if patch is None:
        patch = _Patch(module.__dict__.get("forward"))
        module.__dict__[PATCH] = patch
        module.forward = functools.partial(_patched_forward, module)  # picklable, unlike a bound method
    if any(k == key for k, _ in patch.layers):
        raise UsageError(f"{type(module).__name__} is already wrapped under {key!r}; unwrap it first")
    patch.layers.append((key, layer))


def unwrap(module: nn.Module, key: str) -> Layer | None:
    """Remove the layer under `key` (None if there is none); the last one restores the forward."""
    patch = module.__dict__.get(PATCH)
    if patch is None:
        return None
    found = next((i for i, (k, _) in enumerate(patch.layers) if k == key), None)
    if found is None:
        return None
    _, layer = patch.layers.pop(found)
    if not patch.layers:
        del module.__dict__[PATCH]
        if patch.own_forward is None:
            del module.forward
        else:
            module.forward = patch.own_forward
    return layer


def is_wrapped(module: nn.Module, key: str | None = None) -> bool:
    """Whether the module carries the layer `key` (None: any layer)."""
    patch = module.__dict__.get(PATCH)
    return patch is not None and (key is None or any(k == key for k, _ in patch.layers))


def layer_of(module: nn.Module, key: str) -> Layer | None:
    """The layer under `key`, or None."""
    patch = module.__dict__.get(PATCH)
    return next((layer for k, layer in patch.layers if k == key), None) if patch else None
