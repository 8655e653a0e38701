"""Deltas shared on the Hugging Face Hub: `sparsedelta.load(model, "user/repo")`.

A location that exists on disk is used as it is. Otherwise a hub id ("user/repo", or
"user/repo@revision") is fetched with `huggingface_hub.hf_hub_download` (only the delta file),
which reuses the local hub cache; offline, only the cache is consulted and a miss says so at once.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from ..errors import UsageError

HUB_ID = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(@(?P<revision>[\w./-]+))?")


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


def locate(location: str | os.PathLike, filename: str) -> Path:
    """A local path for a delta given as a path or a hub id.

    Args:
        location: a folder or file on disk, or a hub model repository id, optionally "@revision".
        filename: the file to fetch from a hub repository (the delta file).

    Returns:
        `location` itself when it exists on disk (or is not a hub id: the reader then says what is
        missing), else the cached file.

    Raises:
        UsageError: a hub id that cannot be fetched (offline and not cached, no such repository or file).
    """
    path = Path(location)
    if path.exists() or HUB_ID.fullmatch(str(location)) is None:
        return path
    return from_hub(str(location), filename)


def from_hub(location: str, filename: str) -> Path:
    """The local cached copy of `filename` of the hub repository `location` ("user/repo[@revision]"),
    fetched when online; never a local path of the same name."""
    match = HUB_ID.fullmatch(location)
    if match is None:
        raise UsageError(f"{location!r} is not a hub repository id (user/repo or user/repo@revision)")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
    except ImportError as e:
        raise UsageError(
            f"{location!r} is not a local path; loading it as a hub id needs huggingface_hub (pip install huggingface_hub)"
        ) from e
    repo, revision = match["repo"], match["revision"]
    reason = unreachable_reason()
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=reason is not None))
    except EntryNotFoundError as e:  # offline and not cached, or the repository lacks the file
        at = "" if revision is None else f" at revision {revision!r}"
        if reason is not None:
            raise UsageError(
                f"{location!r} is not a local path, and as a hub id it cannot be loaded: the Hugging Face Hub is not "
                f"reachable ({reason}) and the local hub cache has no {filename} for {repo!r}{at}. Download it once "
                "while online, or pass the delta's local folder."
            ) from e
        raise UsageError(f"{location!r} is not a local path, and {repo!r}{at} has no {filename} on the hub: {e}") from e
    except HfHubHTTPError as e:  # no such repository, gated, or a server error
        raise UsageError(f"{location!r} is not a local path, and the hub refused it as a repository id: {e}") from e
