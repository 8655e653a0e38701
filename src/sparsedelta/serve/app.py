"""The HTTP side of `sparsedelta serve`: OpenAI's /v1/models, /v1/completions and /v1/chat/completions
(plain and streamed as server-sent events) over an Engine; POST and DELETE /v1/adapters to load and
unload deltas at run time; /health and Prometheus' /metrics.

Bodies are checked here rather than by pydantic models so that every refusal has OpenAI's error shape,
{"error": {"message", "type", "code"}}, with 400 (bad parameters), 401 (API key), 403 (admin without
a key), 404 (unknown model), 409 (a name taken), 413 (body too large), 429 (queue full, with
Retry-After) or 504 (the request's timeout ran out).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..core.io import DeltaFileError
from ..errors import UnknownAdapterError, UsageError
from ..train.tasks import GENERATIVE
from . import admin
from .classify import Classification, Classifier
from .engine import BASE, Engine, QueueFull
from .engine import Request as Job
from .metrics import Metrics

MAX_BODY = 4 * 2**20  # bytes of a request body, by default
MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_INPUTS = 1024  # texts in one /v1/classify request


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def error_response(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    body = {"error": {"message": e.message, "type": e.type, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=headers)


def create_app(engine: Engine | Classifier, api_key: str | None = None, adapters_dir=None, max_body: int = MAX_BODY) -> FastAPI:
    app = FastAPI(title="sparsedelta serve")
    metrics = Metrics(engine)
    generates = isinstance(engine, Engine)

    def endpoint_for(generating: bool) -> None:
        if generates != generating:
            what, use = ("a causal LM", "/v1/completions or /v1/chat/completions") if generates else ("a classifier", "/v1/classify")
            raise ApiError(400, f"this server serves {what}: use {use}", code="wrong_endpoint")

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.url.path != "/health" and request.headers.get("authorization") != f"Bearer {api_key}":
            return error_response(ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                                           "authentication_error", "invalid_api_key"))  # fmt: skip
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": engine.queue.qsize(), **engine.stats}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        ids = ["base", *(a for a in engine.adapters if engine.serves(a))]
        return {"object": "list", "data": [_model(i) for i in ids]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request, max_body)
        endpoint_for(generating=True)
        adapter = _adapter(engine, body)
        prompts = body.get("prompt")
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        if not isinstance(prompts, list) or not 1 <= len(prompts) <= MAX_PROMPTS:
            raise ApiError(400, f"prompt must be a string, a list of token ids, or a list of 1-{MAX_PROMPTS} of those",
                           code="invalid_prompt")  # fmt: skip
        ids = [_prompt_ids(engine, p) for p in prompts]
        return await _serve(engine, metrics, request, body, adapter, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _body(request, max_body)
        endpoint_for(generating=True)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ApiError(400, "messages must be a non-empty list of {role, content} objects", code="invalid_messages")
        adapter = _adapter(engine, body)
        template = engine.templates.get(adapter) or engine.tokenizer.chat_template
        if not template:
            raise ApiError(400, f"model {body['model']!r} has no chat template; use /v1/completions", code="no_chat_template")
        try:
            text = engine.chat_prompt(messages, template)
        except Exception as e:  # the template refused the messages (jinja's raise_exception, a missing key)
            raise ApiError(400, f"the chat template cannot format these messages: {e}", code="invalid_messages") from None
        ids = engine.encode(text, add_special_tokens=False)
        return await _serve(engine, metrics, request, body, adapter, [ids], chat=True)

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = await _body(request, max_body)
        endpoint_for(generating=False)
        adapter = _adapter(engine, body)
        texts = _inputs(body.get("input"))
        loop = asyncio.get_running_loop()
        job = Classification(adapter, texts, loop, loop.create_future(), timeout=engine.timeout)
        started, outcome, tokens = time.monotonic(), "ok", 0
        _submit(engine, metrics, [job], body["model"])
        try:
            results, tokens = await asyncio.wait_for(job.done, engine.timeout + 5)
        except TimeoutError:
            outcome = "timeout"
            raise ApiError(504, f"the request ran past the server's timeout ({engine.timeout:g} s)", "timeout", "timeout") from None
        except RuntimeError as e:
            outcome = "error"
            raise ApiError(500, str(e), "server_error", "engine_error") from None
        finally:
            job.cancelled = True
            metrics.answered(body["model"], outcome, tokens, time.monotonic() - started)
        labels = engine.labels(adapter)
        return {"object": "list", "model": body["model"], "labels": labels, "data": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(request: Request):
        _admin_allowed(api_key)
        body = await _body(request, max_body)
        try:
            name = admin.check_name(body.get("name"), {"base", engine.model_name, *engine.adapters})
            tasks = GENERATIVE if generates else ("classification",)
            found = await asyncio.to_thread(admin.find, body.get("path"), adapters_dir, tasks)  # may download: off the loop
        except UsageError as e:
            raise ApiError(409 if isinstance(e, admin.NameTaken) else 400, str(e), code="invalid_adapter") from None
        try:
            await asyncio.wrap_future(engine.call(lambda: engine.attach(name, found)))
        except (UsageError, DeltaFileError, OSError) as e:
            raise ApiError(409 if isinstance(e, admin.NameTaken) else 400, str(e), code="invalid_adapter") from None
        return _model(name)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        _admin_allowed(api_key)
        try:
            done = engine.unload(name, lambda: engine.detach(name))
        except UnknownAdapterError:
            raise ApiError(404, f"no adapter {name!r} is served; GET /v1/models lists them", code="model_not_found") from None
        await asyncio.wrap_future(done)  # after its last request has finished
        return {"id": name, "object": "model", "deleted": True}

    return app


def _model(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "sparsedelta"}


def _admin_allowed(api_key: str | None) -> None:
    if not api_key:
        raise ApiError(403, "loading and unloading adapters needs an API key: start the server with --api-key",
                       "permission_error", "admin_disabled")  # fmt: skip


def _inputs(given) -> list[tuple[str, ...]]:
    """/v1/classify's input: a text, or a list of texts and [text, text] pairs."""
    items = [given] if isinstance(given, str) else given
    ok = lambda t: isinstance(t, str) and t  # noqa: E731
    if (not isinstance(items, list) or not 1 <= len(items) <= MAX_INPUTS
            or not all(ok(t) or (isinstance(t, list) and len(t) == 2 and all(map(ok, t))) for t in items)):  # fmt: skip
        raise ApiError(400, f"input must be a non-empty text or a list of 1-{MAX_INPUTS} texts or [text, text] pairs", code="invalid_input")
    return [(t,) if isinstance(t, str) else tuple(t) for t in items]


def _submit(engine, metrics: Metrics, jobs: list, model: str) -> None:
    """Queue every job, or none: a full queue answers 429, an adapter unloaded a moment ago 404."""
    try:
        for job in jobs:
            engine.submit(job)
    except (QueueFull, UnknownAdapterError) as e:
        for job in jobs:
            job.cancelled = True
        metrics.answered(model, "refused", 0, 0.0)
        if isinstance(e, UnknownAdapterError):
            raise ApiError(404, f"the model {model!r} does not exist; GET /v1/models lists the served ones", code="model_not_found") from None
        raise ApiError(429, "the server's queue is full; retry later", "rate_limit_error", "queue_full") from None


def _prompt_ids(engine: Engine, prompt) -> list[int]:
    if isinstance(prompt, str) and prompt:
        return engine.encode(prompt)
    vocab = len(engine.tokenizer)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
        return prompt
    raise ApiError(400, f"each prompt must be a non-empty string or a list of token ids in [0, {vocab})", code="invalid_prompt")


async def _body(request: Request, limit: int) -> dict:
    too_big = ApiError(413, f"the body is larger than the server's limit ({limit:,} bytes; --max-body-kib)", code="body_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    raw = bytearray()
    async for chunk in request.stream():  # a chunked body has no length to check first
        raw += chunk
        if len(raw) > limit:
            raise too_big
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the body is not JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body


def _adapter(engine: Engine, body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "give the model: an adapter name or 'base' (GET /v1/models lists them)", code="missing_model")
    if model in ("base", BASE, engine.model_name):
        return BASE
    if not engine.serves(model):
        raise ApiError(404, f"the model {model!r} does not exist; GET /v1/models lists the served ones", code="model_not_found")
    return model


def _number(body: dict, key: str, default, low, high, kind=float):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or not low <= value <= high:
        raise ApiError(400, f"{key} must be {'a whole number' if kind is int else 'a number'} in [{low}, {high}]; got {value!r}",
                       code="invalid_parameter")  # fmt: skip
    return kind(value)


def _jobs(engine: Engine, body: dict, adapter: str, prompts: list[list[int]], loop) -> list[Job]:
    """One engine request per prompt and choice (OpenAI's order: prompt by prompt, n choices each)."""
    limit = engine.max_tokens
    max_tokens = _number(body, "max_tokens", body.get("max_completion_tokens", limit), 1, limit, int)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of at most 4 non-empty strings", code="invalid_parameter")
    n = _number(body, "n", 1, 1, MAX_N, int)
    temperature, top_p = _number(body, "temperature", 1.0, 0, 2), _number(body, "top_p", 1.0, 1e-9, 1)
    seed = _number(body, "seed", None, -(2**63), 2**63 - 1, int)
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension, for benchmarks: always max_tokens tokens
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "ignore_eos must be true or false", code="invalid_parameter")
    for ids in prompts:
        if not ids:
            raise ApiError(400, "the prompt has no tokens", code="invalid_prompt")
        if engine.max_positions and len(ids) + max_tokens > engine.max_positions:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceed the model's "
                                f"{engine.max_positions} positions", code="context_length_exceeded")  # fmt: skip
    if len(prompts) * n > engine.queue.maxsize:
        raise ApiError(400, f"{len(prompts)} prompts × n = {n} exceed the server's queue ({engine.queue.maxsize})", code="invalid_parameter")
    return [Job(adapter, ids, max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                seed=None if seed is None else seed + choice,  # the n choices of a seeded request differ, repeatably
                timeout=engine.timeout, ignore_eos=ignore_eos, loop=loop, events=asyncio.Queue())
            for ids in prompts for choice in range(n)]  # fmt: skip


async def _serve(engine: Engine, metrics: Metrics, request: Request, body: dict, adapter: str, prompts: list[list[int]], chat: bool):
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", code="invalid_parameter")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", code="invalid_parameter")
    jobs = _jobs(engine, body, adapter, prompts, asyncio.get_running_loop())
    model, started = body["model"], time.monotonic()
    _submit(engine, metrics, jobs, model)
    meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()), "model": model}

    def usage() -> dict:
        prompt, completion = sum(map(len, prompts)), sum(len(job.tokens) for job in jobs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def record() -> None:
        outcomes = {job.finish if job.finish in ("error", "timeout", "cancelled") else "ok" for job in jobs}
        metrics.answered(model, min(outcomes - {"ok"}, default="ok"), sum(map(len, prompts)), time.monotonic() - started)

    if stream:
        chunks = _chunks(jobs, request, meta, chat, usage if options.get("include_usage") else None, record)
        return StreamingResponse(chunks, media_type="text/event-stream")
    texts, finishes, error = [[] for _ in jobs], [None] * len(jobs), None
    try:
        async for i, (kind, value) in _merged(jobs, request):
            if kind == "text":
                texts[i].append(value)
            elif kind == "error":
                error = value
            else:
                finishes[i] = value
    finally:
        record()
    if error is not None:
        raise ApiError(500, error, "server_error", "engine_error")
    if "timeout" in finishes:
        raise ApiError(504, f"the request ran past the server's timeout ({engine.timeout:g} s)", "timeout", "timeout")
    choices = []
    for i, (text, finish) in enumerate(zip(texts, finishes, strict=True)):
        content = "".join(text)
        choice = {"index": i, "message": {"role": "assistant", "content": content}} if chat else {"index": i, "text": content, "logprobs": None}
        choices.append({**choice, "finish_reason": finish})
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": usage()}


async def _merged(jobs: list[Job], request: Request):
    """(choice index, event) of every job, as they come."""
    if len(jobs) == 1:
        async for event in _events(jobs[0], request):
            yield 0, event
        return
    events: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, job: Job) -> None:
        try:
            async for event in _events(job, request):
                await events.put((i, event))
        finally:
            await events.put((i, None))

    tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        left = len(jobs)
        while left:
            i, event = await events.get()
            if event is None:
                left -= 1
            else:
                yield i, event
    finally:
        for task in tasks:
            task.cancel()


async def _events(job: Job, request: Request):
    """The job's events until it is done; the job is dropped if the client goes away or time runs out."""
    until = time.monotonic() + job.timeout + 5  # the worker enforces the timeout; this guards a stuck worker
    try:
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                if time.monotonic() > until:
                    yield "done", "timeout"
                    return
                continue
            yield event
            if event[0] != "text":
                return
    finally:
        job.cancelled = True  # no effect on a finished job; drops a running or queued one


async def _chunks(jobs: list[Job], request: Request, meta: dict, chat: bool, usage, record):
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(i: int, text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text is not None else {})
            choice = {"index": i, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**meta, 'object': kind, 'choices': [choice]})}\n\n"

    try:
        if chat:
            for i in range(len(jobs)):
                yield chunk(i, None, None, first=True)
        async for i, (event, value) in _merged(jobs, request):
            if event == "text":
                yield chunk(i, value, None)
            elif event == "error":
                yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error', 'code': 'engine_error'}})}\n\n"
            else:
                yield chunk(i, None, value)
        if usage is not None:  # stream_options.include_usage: one last chunk without choices
            yield f"data: {json.dumps({**meta, 'object': kind, 'choices': [], 'usage': usage()})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        record()
