"""The classification engine of `sparsedelta serve` (POST /v1/classify): texts of concurrent requests
for different adapters are labelled together, one mixed-task forward per base model and batch.

A request holds any number of texts (or text pairs); the worker takes waiting requests until it has
`max_batch` texts (waiting up to `max_wait_ms` for more when it has fewer), runs each base's share in
chunks of `max_batch`, and answers every request with a label, its probability and every label's
probability per text, the same as `predict` gives for that text alone (up to float rounding)."""

from __future__ import annotations

import asyncio
import queue
import time
from dataclasses import dataclass, field

import torch

from ..core.adapters import delete_adapter
from ..core.io import load
from ..errors import UsageError
from .admin import check_name
from .worker import Worker, base_in_weights

MAX_LENGTH = 512  # tokens kept of each text, at most (less when the tokenizer says so)


@dataclass
class Classification:
    adapter: str
    texts: list[tuple[str, ...]]
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future  # set to (results, prompt tokens), or an exception
    timeout: float = 60.0
    created: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def answer(self, value=None, error: BaseException | None = None) -> None:
        def settle():
            if not self.done.done():
                self.done.set_exception(error) if error is not None else self.done.set_result(value)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop closed: the server is shutting down
            pass


class Classifier(Worker):
    name = "sparsedelta-classifier"

    def __init__(self, groups, *, model_name: str = "base", max_batch: int = 16, max_wait_ms: float = 5, queue_size: int = 256,
                 timeout: float = 60.0, threads: int | None = None):  # fmt: skip
        super().__init__([n for g in groups for n in g.names], model_name=model_name, max_batch=max_batch,
                         max_wait_ms=max_wait_ms, queue_size=queue_size, timeout=timeout, threads=threads)  # fmt: skip
        self.groups = groups
        self.group_of = {n: g for g in groups for n in g.names}
        for group in groups:
            base_in_weights(group.task.model)

    def labels(self, adapter: str) -> list[str]:
        return self._group(adapter).task.label_names

    def attach(self, name: str, found) -> None:
        """Load a delta as adapter `name` onto the base whose head has its run's labels (a bare delta:
        the first base); a label set no base has needs a server of its own."""
        check_name(name, self.adapters)
        labels = tuple(found.labels) if found.labels else None
        group = next((g for g in self.groups if labels is None or tuple(g.task.label_names) == labels), None)
        if group is None:
            raise UsageError(f"its labels {list(labels)} are none of the served heads'; serve it with --adapter on a restart")
        load(group.task.model, found.file, adapter_name=name)
        base_in_weights(group.task.model)  # load makes the new delta the active one
        group.names.append(name)
        self.group_of[name] = group
        self.adapters.append(name)

    def detach(self, name: str) -> None:
        group = self.group_of.pop(name)
        delete_adapter(group.task.model, name)
        group.names.remove(name)

    def _cycle(self) -> None:
        jobs = self._take()
        if not jobs:
            return
        try:
            with torch.no_grad():
                results = self._classify(jobs)
        except Exception as e:  # a bug or an out-of-memory: fail these requests, keep serving
            for job in jobs:
                job.answer(error=RuntimeError(f"{type(e).__name__}: {e}"))
        else:
            for job, result in zip(jobs, results, strict=True):
                job.answer(result)
        finally:
            for job in jobs:
                self._leave(job)

    def _take(self) -> list[Classification]:
        """Waiting requests until they hold max_batch texts (at least one request)."""
        taken, texts = [], 0
        try:
            taken.append(self.queue.get(timeout=0.1))
            texts = len(taken[0].texts)
            until = time.monotonic() + self.max_wait
            while texts < self.max_batch and (left := until - time.monotonic()) > 0:
                taken.append(self.queue.get(timeout=left))
                texts += len(taken[-1].texts)
        except queue.Empty:
            pass
        alive = []
        for job in taken:
            if job.cancelled or time.monotonic() > job.created + job.timeout:
                self.stats["dropped"] += 1
                job.answer(error=TimeoutError())
                self._leave(job)
            else:
                alive.append(job)
        return alive

    def _classify(self, jobs: list[Classification]) -> list[tuple[list[dict], int]]:
        rows = [(j, i) for j, job in enumerate(jobs) for i in range(len(job.texts))]
        out: list[list] = [[None] * len(job.texts) for job in jobs]
        tokens = [0] * len(jobs)
        for group in self.groups:
            for arity in (1, 2):  # texts and text pairs in batches of their own
                mine = [(j, i) for j, i in rows if self._group(jobs[j].adapter) is group and len(jobs[j].texts[i]) == arity]
                for start in range(0, len(mine), self.max_batch):
                    chunk = mine[start : start + self.max_batch]
                    names, texts = [jobs[j].adapter for j, _ in chunk], [jobs[j].texts[i] for j, i in chunk]
                    probabilities, lengths = self._forward(group, names, texts)
                    self._count(len(chunk))
                    labels = group.task.label_names
                    for (j, i), p, n in zip(chunk, probabilities, lengths, strict=True):
                        out[j][i] = {"index": i, "label": labels[int(p.argmax())], "score": float(p.max()),
                                     "probabilities": dict(zip(labels, p.tolist(), strict=True))}  # fmt: skip
                        tokens[j] += n
        return list(zip(out, tokens, strict=True))

    def _group(self, adapter: str):
        return self.group_of.get(adapter) or self.groups[0]  # the base's rows: the first base

    def _count(self, rows: int) -> None:
        self.stats["steps"] += 1
        self.stats["most_rows"] = max(self.stats["most_rows"], rows)
        if self.metrics is not None:
            self.metrics.step(rows, 0)

    def _forward(self, group, names: list[str], texts: list[tuple[str, ...]]):
        tokenizer, model = group.task.tokenizer, group.task.model
        columns = [list(c) for c in zip(*texts, strict=True)]
        encoded = tokenizer(*columns, truncation=True, max_length=min(MAX_LENGTH, tokenizer.model_max_length), padding=True,
                            return_tensors="pt")  # fmt: skip
        device = next(model.parameters()).device
        logits = model(**{k: v.to(device) for k, v in encoded.items()}, adapter_names=names).logits
        return logits.float().softmax(-1).cpu(), encoded["attention_mask"].sum(-1).tolist()

