"""What every serving engine shares: one worker thread owns the model(s); requests wait in a bounded
queue, counted per adapter while queued or running; loading and unloading adapters run on the worker
between two steps (`call`), so no forward ever sees a model half changed, and an unload waits until
no request for that adapter is queued or running."""

from __future__ import annotations

import queue
import threading
from collections import Counter
from concurrent.futures import Future

import torch

from ..core.adapters import set_adapter
from ..core.mixed import BASE
from ..errors import UnknownAdapterError


def base_in_weights(model) -> None:
    """No delta merged into the weights: every forward of a server is a mixed batch, which would
    otherwise take the active delta out and put it back each time (37 ms of a 16-row step of SmolLM2)."""
    if getattr(model, "_sparsedelta", None) is not None:
        set_adapter(model, None)


class QueueFull(Exception):
    """The engine's queue holds `queue_size` requests: the client should retry later."""


class Worker:
    name = "sparsedelta-worker"

    def __init__(self, adapters: list[str], *, model_name: str, max_batch: int, max_wait_ms: float, queue_size: int, timeout: float,
                 threads: int | None = None):  # fmt: skip
        self.adapters, self.model_name = list(adapters), model_name
        self.threads = threads  # the worker's intra-op threads (None: torch's default)
        self.max_batch, self.max_wait, self.timeout = max_batch, max_wait_ms / 1000, timeout
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.stats = {"steps": 0, "most_rows": 0, "joined": 0, "dropped": 0, "rows": 0}  # shown by /health
        self.inflight: Counter[str] = Counter()  # requests queued or running, per adapter
        self.unloading: set[str] = set()  # adapters refusing new requests while their last ones finish
        self.metrics = None  # told each step's rows and tokens (serve.metrics.Metrics)
        self._count_lock = threading.Lock()
        self._calls: queue.Queue = queue.Queue()  # (fn, ready, future) to run on the worker
        self._waiting_calls: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for _, _, future in self._waiting_calls + list(self._calls.queue):
            future.cancel()  # an unload still waiting: the server is going away anyway

    def serves(self, name: str) -> bool:
        return name == BASE or (name in self.adapters and name not in self.unloading)

    def submit(self, request) -> None:
        """Queue a request (anything with an `adapter`); QueueFull when the queue is full."""
        with self._count_lock:  # counted before it is queued: an unload never misses it
            if not self.serves(request.adapter):
                raise UnknownAdapterError(f"no adapter {request.adapter!r} is served")
            self.inflight[request.adapter] += 1
        try:
            self.queue.put_nowait(request)
        except queue.Full:
            self._leave(request)
            raise QueueFull from None

    def call(self, fn, ready=lambda: True) -> Future:
        """Run fn() on the worker between two steps, once ready() holds; its result comes in the future."""
        future: Future = Future()
        self._calls.put((fn, ready, future))
        return future

    def unload(self, name: str, remove) -> Future:
        """Refuse new requests for the adapter now; run remove() once its last request has finished."""
        with self._count_lock:
            if not self.serves(name) or name == BASE:
                raise UnknownAdapterError(f"no adapter {name!r} is served")
            self.unloading.add(name)

        def idle() -> bool:
            with self._count_lock:
                return self.inflight[name] == 0

        def done():
            try:
                remove()
            finally:
                self.adapters.remove(name)
                self.unloading.discard(name)

        return self.call(done, idle)

    def _leave(self, request) -> None:
        """The request is finished, failed or dropped: it no longer holds its adapter."""
        with self._count_lock:
            self.inflight[request.adapter] -= 1
            if self.inflight[request.adapter] <= 0:
                del self.inflight[request.adapter]

    def _run_calls(self) -> None:
        while True:
            try:
                self._waiting_calls.append(self._calls.get_nowait())
            except queue.Empty:
                break
        waiting = []
        for fn, ready, future in self._waiting_calls:
            if not ready():
                waiting.append((fn, ready, future))
            elif future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to the caller, who reports it
                    future.set_exception(e)
        self._waiting_calls = waiting

    def _loop(self) -> None:
        if self.threads:  # OpenMP's thread count is a per-thread setting: set it on the thread that computes
            torch.set_num_threads(self.threads)
        while not self._stop.is_set():
            self._run_calls()
            self._cycle()

    def _cycle(self) -> None:
        """One round of work: take waiting requests and run one step (the subclass's job)."""
        raise NotImplementedError
