"""Fail fast, with a clear message, when something must come from the Hugging Face Hub but cannot.

Without this, an offline machine spends half a minute in retries and then raises a long traceback."""

from __future__ import annotations

import os

from ..core.remote import offline_mode, unreachable_reason
from ..errors import UsageError

__all__ = ["offline_mode", "require_hub", "unreachable_reason"]


def require_hub(option: str, name: str, local_hint: str) -> None:
    """Raise UsageError before a download that cannot succeed."""
    reason = unreachable_reason()
    if reason is not None and not _cached(name):
        raise UsageError(
            f"{option} {name}: this needs the Hugging Face Hub, which is not reachable ({reason}) and "
            f"{name!r} is not in the local cache. Download it once while online, or {local_hint}"
        )


def _cached(name: str) -> bool:
    """Whether a model or dataset repository of that id has a snapshot in the hub cache."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    cache = constants.HF_HUB_CACHE
    folder = name.replace("/", "--")
    return any(os.path.isdir(os.path.join(cache, f"{kind}--{folder}", "snapshots")) for kind in ("models", "datasets"))
