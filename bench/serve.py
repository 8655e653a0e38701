"""Serving load on loopback: `sparsedelta serve` over the embedded SmolLM2-135M-Instruct, holding only
the base or 1, 4, 16 random deltas, driven by C concurrent clients (asyncio + httpx).

Each delta is random at DENSITY of every projection (0.5%: the default SFT job's SaRA selects 0.47%),
saved as a delta file and served with --adapter NAME=FILE. Every request is a /v1/completions call
with a fixed prompt (round-robin over PROMPTS), max_tokens fixed, temperature 0 and ignore_eos, so
every request generates the same number of tokens; its model is round-robin over the served adapters
("base" on the base-only server). Per (server, clients): requests/s, generated tokens/s (from
usage.completion_tokens), p50 / p99 latency; bounded by a request count and a wall-time limit. The
one-at-a-time configuration is 1 client. Servers run one at a time, in alternating order over
--rounds; medians and the spread over rounds are printed with the ratios to the base-only server at
the same clients and to one-at-a-time on the same server.

    .venv/bin/python bench/serve.py            # the full run
    .venv/bin/python bench/serve.py --quick    # a smoke run (base and 4 adapters, few requests), about 2 minutes

Writes bench/results/serve.json (serve-quick.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
DENSITY = 0.005
PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea:",
    "Explain in one sentence why the sky is blue.",
    "List three fruits that are red:",
    "Once upon a time, in a small village by the mountains,",
    "The three laws of thermodynamics say that",
    "Translate to German: The weather is nice today.",
    "def fibonacci(n):",
)


def make_deltas(count: int, folder: Path, density: float = DENSITY) -> list[Path]:
    """`count` random deltas over the projections of the embedded SmolLM2, saved as delta files."""
    import torch

    import sparsedelta as sd
    from sparsedelta.models.causal_lm import default_targets
    from sparsedelta.train.finished import bare_base

    _, task = bare_base(None, "causal-lm")
    model = task.model
    gen = torch.Generator().manual_seed(0)
    files = []
    for t in range(count):
        positions, values = {}, {}
        for path, p in model.named_parameters():
            if path.endswith("proj.weight"):  # randint + unique: a randperm of every layer is slow
                positions[path] = torch.randint(p.numel(), (int(p.numel() * density),), generator=gen).unique()
                values[path] = torch.randn(len(positions[path]), generator=gen) * 1e-3
        name = f"t{t}"
        sd.add_delta(model, sd.RandomConfig(density=density, **default_targets(model)), positions, adapter_name=name, values=values)
        files.append(sd.save(model, folder / name, adapter_name=name))
        sd.delete_adapter(model, name)
    return files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m sparsedelta serve` in a subprocess, up once /health answers (bounded in time)."""

    def __init__(self, deltas: list[Path], args: argparse.Namespace, log: Path):
        import httpx

        self.url = f"http://127.0.0.1:{free_port()}"
        adapters = [f"--adapter=t{i}={f}" for i, f in enumerate(deltas)]
        cmd = [sys.executable, "-m", "sparsedelta", "serve", *adapters, "--port", self.url.rsplit(":", 1)[1],
               "--max-batch", str(args.max_batch), "--max-tokens", str(args.max_tokens), "--timeout", "600", "--queue-size", "1024"]  # fmt: skip
        self.log = log.open("w")  # a file, not a pipe: a full pipe would block the server
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        env.pop("SPARSEDELTA_API_KEY", None)
        if args.server_threads:  # the worker's threads on a CPU shared with other jobs: see BENCHMARKS.md
            env["OMP_NUM_THREADS"] = str(args.server_threads)
            cmd += ["--threads", str(args.server_threads)]
        self.process = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.models = [f"t{i}" for i in range(len(deltas))] or ["base"]
        start = time.monotonic()
        while time.monotonic() - start < 300:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the server did not answer /health in 300 s: see {log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.log.close()


async def load(server: Server, clients: int, requests: int, time_limit: float, max_tokens: int, progress=None) -> dict:
    """`clients` concurrent clients sending at most `requests` requests in total, none started after
    `time_limit` seconds; the measure of what completed."""
    import httpx

    latencies, tokens, errors = [], [], 0
    issued = 0
    start = time.monotonic()

    async def client(http):
        nonlocal issued, errors
        while issued < requests and time.monotonic() - start < time_limit:
            i = issued
            issued += 1
            body = {"model": server.models[i % len(server.models)], "prompt": PROMPTS[i % len(PROMPTS)],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}  # fmt: skip
            sent = time.monotonic()
            r = await http.post(server.url + "/v1/completions", json=body)
            if r.status_code != 200:
                errors += 1
                continue
            latencies.append(time.monotonic() - sent)
            tokens.append(r.json()["usage"]["completion_tokens"])
            if progress is not None:
                progress.update(1)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.monotonic() - start
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "errors": errors, "wall_s": wall,
            "requests_per_s": len(latencies) / wall, "tokens_per_s": sum(tokens) / wall,
            "p50_s": _quantile(latencies, 0.50), "p99_s": _quantile(latencies, 0.99)}  # fmt: skip


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def measure(adapters: int, files: list[Path], args, log: Path, round_: int) -> list[dict]:
    from tqdm import tqdm

    server = Server(files[:adapters], args, log)
    runs = []
    try:
        asyncio.run(load(server, min(8, max(args.clients)), 8, 120, 4))  # warm: first batches build caches
        plan = [*([1] if adapters in (0, max(args.adapters)) else []), *args.clients]
        for clients in plan:
            count = args.single_requests if clients == 1 else args.requests_per_client * clients
            with tqdm(total=count, desc=f"round {round_} adapters {adapters} clients {clients}", leave=False) as bar:
                run = asyncio.run(load(server, clients, count, args.time_limit, args.max_tokens, bar))
            runs.append({"round": round_, "adapters": adapters, **run})
            print(f"  adapters {adapters:2d} clients {clients:3d}: {run['requests_per_s']:.2f} req/s, "
                  f"{run['tokens_per_s']:.1f} tok/s, p50 {run['p50_s']:.2f} s, p99 {run['p99_s']:.2f} s", flush=True)  # fmt: skip
    finally:
        server.stop()
    return runs


def summarize(runs: list[dict]) -> list[dict]:
    keys = sorted({(r["adapters"], r["clients"]) for r in runs})
    rows = []
    for adapters, clients in keys:
        mine = [r for r in runs if (r["adapters"], r["clients"]) == (adapters, clients)]
        tps = [r["tokens_per_s"] for r in mine]
        row = {"adapters": adapters, "clients": clients, "rounds": len(mine), "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps)}
        for k in ("requests_per_s", "tokens_per_s", "p50_s", "p99_s"):
            row[k] = statistics.median(r[k] for r in mine)
        rows.append(row)
    by = {(r["adapters"], r["clients"]): r for r in rows}
    for row in rows:
        base = by.get((0, row["clients"]))
        single = by.get((row["adapters"], 1))
        row["x_base"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
        row["x_single"] = row["tokens_per_s"] / single["tokens_per_s"] if single and row["clients"] > 1 else None
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| adapters | clients | req/s | tok/s (min-max) | p50 (s) | p99 (s) | × base-only | × one at a time |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        ratio = lambda v: f"{v:.2f}" if v is not None else ""  # noqa: E731
        lines.append(f"| {r['adapters'] or 'base only'} | {r['clients']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} "
                     f"({r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f}) | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
                     f"{ratio(r['x_base'])} | {ratio(r['x_single'])} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: base and 4 adapters, 8 clients, few requests, one round")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16], help="adapter counts (the base-only server always runs)")
    p.add_argument("--clients", type=int, nargs="+", default=[16, 64], help="concurrent clients (one at a time runs as well)")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests per measurement = this × clients")
    p.add_argument("--single-requests", type=int, default=6, help="requests of the one-at-a-time measurement")
    p.add_argument("--time-limit", type=float, default=120, help="seconds after which a measurement starts no request")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--server-threads", type=int, help="the servers' --threads (default: theirs, by the load average)")
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    if args.quick:
        args.adapters, args.clients, args.requests_per_client, args.single_requests = [4], [8], 2, 3
        args.max_tokens, args.rounds, args.time_limit = 16, 1, 60
    args.output = args.output or HERE / "results" / ("serve-quick.json" if args.quick else "serve.json")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        files = make_deltas(max(args.adapters), Path(tmp))
        configs = [0, *args.adapters]
        runs = []
        for round_ in range(args.rounds):
            order = configs if round_ % 2 == 0 else configs[::-1]  # alternate: drifts in the machine's load cancel
            for adapters in order:
                runs += measure(adapters, files, args, Path(tmp) / f"server-{adapters}.log", round_)
    rows = summarize(runs)
    print(table(rows))
    args.output.parent.mkdir(exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.output.write_text(json.dumps({"settings": settings, "density": DENSITY, "wall_s": time.monotonic() - started,
                                       "summary": rows, "runs": runs}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.output} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
