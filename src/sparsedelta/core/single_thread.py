"""Small CPU decompositions on one thread, without touching the process's thread settings.

LAPACK's eigen-decomposition of a few-hundred-wide matrix is slower on two threads than on one,
by far on a busy 2-core CPU (384 x 384 float64 under load: ~750 ms on two threads, ~45-55 ms on
one): its threads wait on each other. `torch.set_num_threads(1)` around the call would change the
thread count of every thread in the process (and of threads started later), so the call runs on
one worker thread instead whose own OpenMP team is one thread (OpenMP keeps that setting per
thread, and MKL follows it). Without a GNU-compatible OpenMP runtime the call runs in place.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_guard = threading.Lock()


@functools.cache
def _worker() -> ThreadPoolExecutor | None:
    try:
        set_threads = ctypes.CDLL(None).omp_set_num_threads  # the OpenMP runtime torch loaded
    except (AttributeError, OSError):
        return None

    def one_thread():
        torch.get_num_threads()  # torch sets a thread's OpenMP team at its first call there: before ours
        set_threads(1)

    return ThreadPoolExecutor(1, thread_name_prefix="sparsedelta-1thread", initializer=one_thread)


def run(fn, *args):
    """fn(*args) on the one-thread worker when its tensors are on the CPU, else in place."""
    if any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args):
        return fn(*args)
    with _guard:  # one worker, even when two threads ask first
        worker = _worker()
    return worker.submit(fn, *args).result() if worker is not None else fn(*args)
