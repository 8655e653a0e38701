"""`sparsedelta serve`: an OpenAI-compatible HTTP server for a causal-LM base and any number of its
deltas, every request decoded in mixed-task batches (`sparsedelta.serve`)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError

NAME = "serve"
KEY_ENV = "SPARSEDELTA_API_KEY"


def add(sub) -> None:
    p = sub.add_parser(NAME, help="serve a causal LM and its deltas over an OpenAI-compatible HTTP API")
    p.add_argument("--model", metavar="PATH_OR_HUB_ID",
                   help="the base model (default: the one the first run folder records, else the embedded SmolLM2-135M-Instruct)")  # fmt: skip
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a delta served as model NAME: a run folder, delta folder or delta file (repeat for more)")  # fmt: skip
    p.add_argument("--task", choices=("causal-lm", "classification"),
                   help="what bare deltas are for (default: a classifier when the delta saves a head); run folders say it themselves")  # fmt: skip
    p.add_argument("--adapters-dir", metavar="DIR",
                   help="where POST /v1/adapters may load deltas from at run time (paths relative to it; hub ids need no folder)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", metavar="KEY", help=f"require Authorization: Bearer KEY (default: ${KEY_ENV}, else none)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N", help="rows decoded together (default 16)")
    p.add_argument("--max-wait-ms", type=float, default=5, metavar="MS",
                   help="how long an idle server waits for more requests to batch with the first (default 5)")  # fmt: skip
    p.add_argument("--queue-size", type=int, default=256, metavar="N",
                   help="requests waiting at most; more are answered 429 (default 256)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=256, metavar="N", help="the most tokens a request may generate (default 256)")
    p.add_argument("--timeout", type=float, default=60, metavar="S", help="seconds a request may take, queue included (default 60)")
    p.add_argument("--max-body-kib", type=int, default=4096, metavar="KIB", help="the largest request body, in KiB (default 4096)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads of the decoding worker (default: one per idle core by the load average, as train does)")  # fmt: skip
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    for flag in ("max_batch", "queue_size", "max_tokens"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.max_wait_ms < 0 or args.timeout <= 0 or args.max_body_kib < 1:
        raise UsageError("--max-wait-ms must be at least 0, --timeout above 0 and --max-body-kib at least 1")
    adapters_dir = Path(args.adapters_dir) if args.adapters_dir else None
    if adapters_dir is not None and not adapters_dir.is_dir():
        raise UsageError(f"--adapters-dir {adapters_dir} is not a folder")
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as e:
        raise UsageError(f"serving needs {e.name}: pip install 'sparsedelta[serve]'") from None
    from ..serve.classify import Classifier
    from ..serve.engine import Engine
    from ..serve.loading import load_served
    from ..train.predict import parse_adapters
    from ..train.threads import pick_threads

    adapters = parse_adapters(args.adapter) if args.adapter else {}
    served = load_served(adapters, args.model, args.task)
    if args.device:
        for group in served.groups:
            group.task.model.to(args.device)
    limits = dict(model_name=served.base_name, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
                  timeout=args.timeout, threads=pick_threads(args.threads))  # fmt: skip
    if served.generates:
        task = served.groups[0].task
        engine = Engine(task.model, task.tokenizer, served.names, templates=served.templates, max_tokens=args.max_tokens, **limits)
    else:
        engine = Classifier(served.groups, **limits)
    engine.start()
    api_key = args.api_key or os.environ.get(KEY_ENV) or None
    kind = "causal LM" if served.generates else "classifier"
    print(f"serving a {kind}: base + {len(served.names)} adapter(s) {served.names} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key else ''}", flush=True)  # fmt: skip
    app = create_app(engine, api_key, adapters_dir, args.max_body_kib * 1024)
    try:  # SIGTERM or Ctrl-C: stop accepting, let the requests in flight finish (up to their timeout), then exit
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=args.timeout + 5)
    finally:
        engine.close()
    return 0
