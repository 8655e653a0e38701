"""How many CPU threads a run uses."""

from __future__ import annotations

import os

import torch


def pick_threads(requested: int | None = None) -> int:
    """`requested`, or one thread per idle core by the 1-minute load average. On a busy machine a
    thread that waits for a descheduled partner stalls every small op: measured on the shared
    2-core CPU (load ~4), a SmolLM2 step of 4x128 tokens took 4.3 s on one thread and 10-33 s on two."""
    if requested:
        return requested
    try:
        busy = os.getloadavg()[0]
    except OSError:  # not available on this platform
        busy = 0.0
    return max(1, min(torch.get_num_threads(), round((os.cpu_count() or 1) - busy)))
