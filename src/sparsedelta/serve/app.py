"""The HTTP side of `sparsedelta serve`: OpenAI's /v1/models, /v1/completions and /v1/chat/completions
(plain and streamed as server-sent events) over an Engine, plus /health.

Bodies are checked here rather than by pydantic models so that every refusal has OpenAI's error shape,
{"error": {"message", "type", "code"}}, with 400 (bad parameters), 401 (API key), 404 (unknown model),
429 (queue full, with Retry-After) or 504 (the request's timeout ran out).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .engine import BASE, Engine, QueueFull
from .engine import Request as Job


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def error_response(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    body = {"error": {"message": e.message, "type": e.type, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=headers)


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="sparsedelta serve")
    names = {"base": BASE, BASE: BASE, engine.model_name: BASE, **{a: a for a in engine.adapters}}

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

    @app.get("/v1/models")
    async def models():
        ids = ["base", *engine.adapters]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "sparsedelta"} for i in ids]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt must be one non-empty string (lists of prompts are not served yet)", code="invalid_prompt")
        adapter = _adapter(names, body)
        ids = engine.encode(prompt)
        return await _serve(engine, request, body, adapter, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ApiError(400, "messages must be a non-empty list of {role, content} objects", code="invalid_messages")
        adapter = _adapter(names, body)
        template = engine.templates.get(adapter) or engine.tokenizer.chat_template
        if not template:
            raise ApiError(400, f"model {body['model']!r} has no chat template; use /v1/completions", code="no_chat_template")
        try:
            text = engine.chat_prompt(messages, template)
        except Exception as e:  # the template refused the messages (jinja's raise_exception, a missing key)
            raise ApiError(400, f"the chat template cannot format these messages: {e}", code="invalid_messages") from None
        ids = engine.encode(text, add_special_tokens=False)
        return await _serve(engine, request, body, adapter, ids, chat=True)

    return app


async def _body(request: Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the body is not JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body


def _adapter(names: dict[str, str], body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "give the model: an adapter name or 'base' (GET /v1/models lists them)", code="missing_model")
    if model not in names:
        raise ApiError(404, f"the model {model!r} does not exist; GET /v1/models lists the served ones", code="model_not_found")
    return names[model]


def _number(body: dict, key: str, default, low, high, kind=float):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or not low <= value <= high:
        raise ApiError(400, f"{key} must be {'a whole number' if kind is int else 'a number'} in [{low}, {high}]; got {value!r}",
                       code="invalid_parameter")  # fmt: skip
    return kind(value)


def _job(engine: Engine, body: dict, adapter: str, ids: list[int], loop) -> Job:
    limit = engine.max_tokens
    max_tokens = _number(body, "max_tokens", body.get("max_completion_tokens", limit), 1, limit, int)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of at most 4 non-empty strings", code="invalid_parameter")
    if _number(body, "n", 1, 1, 1, int) != 1:
        raise ApiError(400, "n must be 1", code="invalid_parameter")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "ignore_eos must be true or false", code="invalid_parameter")
    if not ids:
        raise ApiError(400, "the prompt has no tokens", code="invalid_prompt")
    if engine.max_positions and len(ids) + max_tokens > engine.max_positions:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceed the model's "
                            f"{engine.max_positions} positions", code="context_length_exceeded")  # fmt: skip
    return Job(adapter, ids, max_tokens, temperature=_number(body, "temperature", 1.0, 0, 2),
               top_p=_number(body, "top_p", 1.0, 1e-9, 1), stop=stop, seed=_number(body, "seed", None, -(2**63), 2**63 - 1, int),
               timeout=engine.timeout, ignore_eos=ignore_eos, loop=loop, events=asyncio.Queue())  # fmt: skip


async def _serve(engine: Engine, request: Request, body: dict, adapter: str, ids: list[int], chat: bool):
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", code="invalid_parameter")
    job = _job(engine, body, adapter, ids, asyncio.get_running_loop())
    try:
        engine.submit(job)
    except QueueFull:
        raise ApiError(429, "the server's queue is full; retry later", "rate_limit_error", "queue_full") from None
    meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()), "model": body["model"]}
    if stream:
        return StreamingResponse(_chunks(job, request, meta, chat), media_type="text/event-stream")
    text, finish = [], None
    async for kind, value in _events(job, request):
        if kind == "text":
            text.append(value)
        elif kind == "error":
            raise ApiError(500, value, "server_error", "engine_error")
        else:
            finish = value
    if finish == "timeout":
        raise ApiError(504, f"the request ran past the server's timeout ({engine.timeout:g} s)", "timeout", "timeout")
    usage = {"prompt_tokens": len(ids), "completion_tokens": len(job.tokens), "total_tokens": len(ids) + len(job.tokens)}
    content = "".join(text)
    choice = {"index": 0, "message": {"role": "assistant", "content": content}} if chat else {"index": 0, "text": content, "logprobs": None}
    return {**meta, "object": "chat.completion" if chat else "text_completion",
            "choices": [{**choice, "finish_reason": finish}], "usage": usage}  # fmt: skip


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


async def _chunks(job: Job, request: Request, meta: dict, chat: bool):
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**meta, 'object': kind, 'choices': [choice]})}\n\n"

    if chat:
        yield chunk(None, None, first=True)
    async for event, value in _events(job, request):
        if event == "text":
            yield chunk(value, None)
        elif event == "error":
            yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error', 'code': 'engine_error'}})}\n\n"
        else:
            yield chunk(None, value)
    yield "data: [DONE]\n\n"
