"""The serving engine: one worker thread owns the model and runs every forward; requests wait in a
bounded queue and are decoded together, each row with its own adapter (a mixed-task batch per step).

Continuous batching: the worker keeps one running batch with its KV cache. Before each decoding step
it takes waiting requests up to `max_batch` rows (waiting up to `max_wait_ms` for more only when the
batch is empty), prefills them on their own, left-pads the shorter of the two caches (and its
attention mask) and appends the new rows, so a request starts decoding at the next step instead of
after the running batch ends. A row that finishes (max_tokens, end of sequence, a stop string, its
timeout) or whose client went away leaves the batch at once: its rows of the cache are dropped.

Exactness: every row has its own attention mask and position ids (from the mask), so a greedy row
decodes as it would alone, up to float rounding in batched kernels. Sampling draws each row from
its own torch.Generator, seeded by the request's seed.

Threads: the API side (asyncio) hands a Request to `submit`; the worker pushes ("text", str) and
finally ("done", finish_reason) onto the request's asyncio queue through its event loop. Loading and
unloading adapters (`call`) also run on the worker, between two steps, so no forward ever sees a
model half changed; an unload waits until no request for that adapter is queued or running.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.adapters import delete_adapter, set_adapter, state_of
from ..core.io import load
from ..core.mixed import BASE, mixed_batch
from .admin import check_name
from .worker import QueueFull, Worker, base_in_weights


@dataclass
class Request:
    adapter: str  # an adapter name, or BASE
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    timeout: float = 60.0
    ignore_eos: bool = False  # vLLM's extension: an eos token is generated like any other (benchmarks)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False  # set by the API when the client goes away
    # the worker's state
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finish: str | None = None
    created: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None

    @property
    def deadline(self) -> float:
        return self.created + self.timeout

    def push(self, *event) -> None:
        if self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop closed: the server is shutting down
            pass


class Engine(Worker):
    name = "sparsedelta-engine"

    def __init__(self, model, tokenizer, adapters: list[str], *, model_name: str = "base", templates=None,
                 max_batch: int = 16, max_wait_ms: float = 5, queue_size: int = 256, max_tokens: int = 256,
                 timeout: float = 60.0, threads: int | None = None):  # fmt: skip
        super().__init__(adapters, model_name=model_name, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size,
                         timeout=timeout, threads=threads)  # fmt: skip
        self.model, self.tokenizer = model.eval(), tokenizer
        self.templates = templates or {}  # adapter -> chat template of its run folder
        self.max_tokens = max_tokens
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        eos = {*([] if eos is None else [eos] if isinstance(eos, int) else eos)}
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos = eos
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
        self.device = next(model.parameters()).device
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer's settings are not thread-safe
        self._rows: list[Request] = []  # the running batch, its KV cache and attention mask
        self._cache = self._mask = None
        base_in_weights(model)

    # -- the API side --------------------------------------------------------------------------------
    def encode(self, text: str, **kwargs) -> list[int]:
        with self._tokenizer_lock:
            return self.tokenizer(text, **kwargs)["input_ids"]

    def chat_prompt(self, messages: list[dict], template: str) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)

    def attach(self, name: str, found) -> None:
        """Load a delta found by serve.admin as adapter `name` (on the worker: see Worker.call)."""
        check_name(name, self.adapters)  # again: another request may have taken it meanwhile
        load(self.model, found.file, adapter_name=name)  # checked against this base before any change
        base_in_weights(self.model)  # load makes the new delta the active one
        if found.template:
            self.templates[name] = found.template
        self.adapters.append(name)

    def detach(self, name: str) -> None:
        delete_adapter(self.model, name)
        self.templates.pop(name, None)

    # -- the worker ----------------------------------------------------------------------------------
    def _cycle(self) -> None:
        rows, cache, mask = self._rows, self._cache, self._mask
        new = self._take(block=not rows, room=self.max_batch - len(rows))
        if not new and not rows:
            return
        try:
            with torch.no_grad():
                if new:
                    logits, new_cache, new_mask = self._prefill(new)
                    self.stats["joined"] += len(new) if rows else 0
                    cache, mask = _join(cache, mask, new_cache, new_mask)
                    rows, picking = rows + new, new  # the running rows wait one step for the newcomers
                else:
                    logits, mask = self._step(rows, cache, mask)
                    picking = rows
                self.stats["steps"] += 1
                self.stats["most_rows"] = max(self.stats["most_rows"], len(rows))
                if self.metrics is not None:
                    self.metrics.step(len(rows), len(picking))
                for r, row_logits in zip(picking, logits, strict=True):
                    self._emit(r, self._pick(r, row_logits))
        except Exception as e:  # a bug or an out-of-memory: fail the batch, keep serving
            for r in {id(r): r for r in rows + new}.values():
                r.finish = "error"
                r.push("error", f"{type(e).__name__}: {e}")
                self._leave(r)
            rows, cache, mask = [], None, None
        keep = [i for i, r in enumerate(rows) if r.finish is None and not self._expired(r)]
        if len(keep) < len(rows):
            for r in rows:
                if r.finish is not None:
                    self._leave(r)
            rows = [rows[i] for i in keep]
            if rows:
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask = mask[index]
            else:
                cache = mask = None
        self._rows, self._cache, self._mask = rows, cache, mask
        self.stats["rows"] = len(rows)

    def _take(self, block: bool, room: int) -> list[Request]:
        """Waiting requests, at most `room`; when the batch is empty, wait for the first, then up to
        max_wait for more."""
        taken: list[Request] = []
        if room <= 0:
            return taken
        try:
            if block:
                taken.append(self.queue.get(timeout=0.1))
                until = time.monotonic() + self.max_wait
                while len(taken) < room and (left := until - time.monotonic()) > 0:
                    taken.append(self.queue.get(timeout=left))
            while len(taken) < room:
                taken.append(self.queue.get_nowait())
        except queue.Empty:
            pass
        alive = []
        for r in taken:
            if self._expired(r):
                self._leave(r)
            else:
                alive.append(r)
        return alive

    def _expired(self, r: Request) -> bool:
        """Drop a row whose client went away or whose time ran out (telling the latter)."""
        if r.finish is not None:
            return False
        if r.cancelled:
            r.finish = "cancelled"
            self.stats["dropped"] += 1
            return True
        if time.monotonic() > r.deadline:
            r.finish = "timeout"
            r.push("done", "timeout")
            return True
        return False

    def _prefill(self, new: list[Request]):
        width = max(len(r.prompt_ids) for r in new)
        ids = torch.full((len(new), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, r in enumerate(new):  # left padding: every row's next token is at the last position
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
            r.generator = torch.Generator().manual_seed(r.seed if r.seed is not None else random.getrandbits(63))
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self._forward([r.adapter for r in new], ids, mask, None)
        return out.logits[:, -1].float().cpu(), out.past_key_values, mask

    def _step(self, rows: list[Request], cache, mask):
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        out = self._forward([r.adapter for r in rows], ids, mask, cache)
        return out.logits[:, -1].float().cpu(), mask

    def _forward(self, names: list[str], ids, mask, cache):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        tasks = set(names)
        if self.adapters:  # one task: its merged model, kept merged until another batch needs the weights
            self._merged(next(iter(tasks)) if len(tasks) == 1 and BASE not in tasks else None)
        with mixed_batch(self.model, names) if len(tasks) > 1 else contextlib.nullcontext():
            return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                              use_cache=True, logits_to_keep=1)  # fmt: skip

    def _merged(self, name: str | None) -> None:
        """The delta `name` (None: none) merged into the weights, switched (O(k)) only when it changes:
        a mixed batch needs none merged; rows of one task run fastest on that task's merged model."""
        if state_of(self.model).active != name:
            set_adapter(self.model, name)

    def _pick(self, r: Request, logits: torch.Tensor) -> int:
        if r.temperature <= 0:
            return int(logits.argmax())
        probs = (logits / r.temperature).softmax(-1)
        if r.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= r.top_p  # keep the smallest head of mass >= top_p
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=r.generator))

    def _emit(self, r: Request, token: int) -> None:
        """Add the token to the row, push the text that can no longer change, and finish the row at
        eos, max_tokens or a stop string (cut before it)."""
        if r.finish is not None:
            return
        if token in self.eos and not r.ignore_eos:
            r.finish = "stop"
        else:
            r.tokens.append(token)
            with self._tokenizer_lock:
                r.text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
            cuts = [i for i in (r.text.find(s) for s in r.stop) if i >= 0]
            if cuts:
                r.text, r.finish = r.text[: min(cuts)], "stop"
            elif len(r.tokens) >= r.max_tokens:
                r.finish = "length"
        end = len(r.text)
        if r.finish is None:
            # a stop string may be starting at the end, or a character be half decoded: hold them back
            end -= max((len(s) - 1 for s in r.stop), default=0)
            while end > r.sent and r.text[end - 1] == "\ufffd":
                end -= 1
        if end > r.sent:
            r.push("text", r.text[r.sent : end])
            r.sent = end
        if r.finish is not None:
            r.push("done", r.finish)


def _join(cache, mask, new_cache, new_mask):
    """The running batch's cache and mask with the new rows appended, the shorter left-padded."""
    if cache is None:
        return new_cache, new_mask
    old_len, new_len = mask.shape[1], new_mask.shape[1]
    width = max(old_len, new_len)
    for old, new in zip(cache.layers, new_cache.layers, strict=True):
        for attr in ("keys", "values"):
            a, b = getattr(old, attr), getattr(new, attr)
            a = F.pad(a, (0, 0, width - old_len, 0))
            b = F.pad(b, (0, 0, width - new_len, 0))
            setattr(old, attr, torch.cat([a, b]))
    mask = torch.cat([F.pad(mask, (width - old_len, 0)), F.pad(new_mask, (width - new_len, 0))])
    return cache, mask


__all__ = ["BASE", "Engine", "QueueFull", "Request"]
