"""Fail fast, with a clear message, when something must come from the Hugging Face Hub but cannot.

Without this, an offline machine spends half a minute in retries and then raises a long traceback."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from ..errors import UsageError

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "on", "yes", "true")


def unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached now (None: it can, or a proxy decides)."""
    if offline_mode():
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None  # a proxy may reach what this machine cannot resolve; let the download try
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"cannot connect to {url.hostname} ({e.strerror or e})"
    return None


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
