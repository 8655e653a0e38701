"""Many tasks on one base: inference throughput of a batch spread over T tasks, and the memory of
holding T tasks loaded.

A batch of 64 examples × 128 tokens (random token ids) over T = 1, 4, 16, 64 tasks (row i belongs to
task i mod T), on MiniLM-L6 with a 5-class head; each task is a random delta at 1% of the adapted
layers' entries (every linear layer but the head, as bench.py) with a head of its own. Per T:

    mixed    sparsedelta: model(**batch, adapter_names=names), the base once + each task's rows corrected
    switch   sparsedelta: set_adapter(t), then the rows of task t, for every t (O(k) switches)
    lora     PEFT LoRA: peft_model(**batch, adapter_names=names), rank chosen for the same trainable
             count as the delta (k / Σ(in + out) per task), its head in modules_to_save as well
    base     the base model alone on the whole batch (no adapter attached)

Methods are interleaved over --rounds; medians and the ratios to the base and to LoRA are printed
from the same run. Memory: the bytes each method holds for its T tasks (sparsedelta: positions, θ at
them, values, the head, and the correction cache built by the first mixed batch; LoRA: A, B and the
head copy), and the resident-memory growth while loading them. A profile of one mixed batch at the
largest T lists which operations take the time.

    .venv/bin/python bench/multitask.py                 # the full run (about 10 minutes on 2 idle cores)
    .venv/bin/python bench/multitask.py --quick         # a smoke run (batch 8 x 16, T = 1, 2, 8, one thread), under a minute

Writes bench/results/multitask.json (multitask-quick.json).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DENSITY = 0.01
HEAD = "classifier"


def rss_mib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def load_base(model_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=5).eval()


def adapted(model) -> dict:
    """The adapted linear layers (every one but the head), by name."""
    from torch import nn

    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and HEAD not in n}


def make_batch(rows: int, seq: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (rows, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def names_for(tasks: int, rows: int) -> list[str]:
    return [f"t{i % tasks}" for i in range(rows)]


def attach_deltas(model, tasks: int, seed: int = 0) -> int:
    """T random deltas at DENSITY of each adapted layer, values ~ N(0, 1e-3), each with a random head.
    Returns the entries of one task's delta."""
    import torch

    import sparsedelta as sd

    gen = torch.Generator().manual_seed(seed)
    layers = adapted(model)
    config = sd.RandomConfig(density=DENSITY, target_modules=list(layers), modules_to_save=[HEAD])
    k = 0
    for t in range(tasks):
        positions, values = {}, {}
        for name, module in layers.items():
            n = module.weight.numel()
            count = max(1, round(DENSITY * n))
            positions[f"{name}.weight"] = torch.randperm(n, generator=gen)[:count].sort().values
            values[f"{name}.weight"] = torch.randn(count, generator=gen) * 1e-3
        sd.add_delta(model, config, positions, f"t{t}", values=values, trainable=False)
        with torch.no_grad():
            for p in sd.state_of(model).adapters[f"t{t}"].saved.values():
                p.normal_(0, 0.05, generator=gen)
        k = sum(len(v) for v in positions.values())
    return k


def attach_lora(model, tasks: int, k: int):
    """T PEFT LoRA adapters of the rank that trains k entries per task (at least 1)."""
    from peft import LoraConfig, get_peft_model

    layers = adapted(model)
    rank = max(1, round(k / sum(m.in_features + m.out_features for m in layers.values())))
    config = dict(r=rank, target_modules=list(layers), modules_to_save=[HEAD], init_lora_weights=False)
    peft_model = get_peft_model(model, LoraConfig(**config), adapter_name="t0")
    for t in range(1, tasks):
        peft_model.add_adapter(f"t{t}", LoraConfig(**config))
    return peft_model.eval(), rank


def delta_bytes(model) -> int:
    """What sparsedelta holds for its tasks: every delta's buffers and values, the saved heads, and
    the correction forms (rowwise.py) and the tables of mixed batches (mixed.py) built so far."""
    import sparsedelta as sd
    from sparsedelta.core import rowwise

    state = sd.state_of(model)
    total = 0
    for adapter in state.adapters.values():
        for delta in adapter.deltas.values():
            total += sum(t.numel() * t.element_size() for t in [*delta.buffers(), delta.values])
            for _, prepared in rowwise._CACHE.get(delta, {}).values():
                parts = [prepared.crow_indices(), prepared.col_indices(), prepared.values()] if hasattr(
                    prepared, "crow_indices") else list(prepared)  # fmt: skip
                total += sum(t.numel() * t.element_size() for t in parts)
        total += sum(p.numel() * p.element_size() for p in adapter.saved.values())
    return total + table_bytes(model)


def table_bytes(model) -> int:
    """The mixed batches' tables of every task's linear entries, per layer (core/mixed.py)."""
    from sparsedelta.core import mixed

    layout = mixed._LAYOUTS.get(model)
    total = 0
    for _, layer in layout.layers.values() if layout is not None else ():
        if layer._table is not None:
            outs, ins, values, (_, pointers) = layer._table[2]
            total += sum(t.numel() * t.element_size() for t in (outs, ins, values, pointers))
    return total


def lora_bytes(peft_model) -> int:
    return sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "lora_" in n or
               "modules_to_save" in n)  # fmt: skip


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def profile_mixed(model, batch, names, top: int = 8) -> list[dict]:
    """The operations that take the time in one mixed batch, by self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**batch, adapter_names=names)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total}
        for e in events[:top]
    ]


def run(args) -> dict:
    import torch

    import sparsedelta as sd

    torch.set_num_threads(args.threads)
    batch = make_batch(args.rows, args.seq)
    base = load_base(args.model)
    models = {}
    results = {"rows": args.rows, "seq": args.seq, "density": DENSITY, "threads": args.threads, "tasks": {}}
    for tasks in args.tasks:
        before = rss_mib()
        model = load_base(args.model)
        k = attach_deltas(model, tasks)
        delta_rss = rss_mib() - before
        before = rss_mib()
        lora, rank = attach_lora(load_base(args.model), tasks, k)
        lora_rss = rss_mib() - before
        models[tasks] = (model, lora)
        results["tasks"][tasks] = {"k": k, "lora_rank": rank, "lora_k": sum(
            p.numel() for n, p in lora.named_parameters() if "lora_" in n and n.endswith(".t0.weight")),
            "delta_load_rss_mib": delta_rss, "lora_load_rss_mib": lora_rss, "times": {}}  # fmt: skip

    def measure(method, tasks):
        model, lora = models[tasks]
        names = names_for(tasks, args.rows)
        if method == "base":
            return lambda: base(**batch)
        if method == "mixed":
            return lambda: model(**batch, adapter_names=names)
        if method == "lora":
            return lambda: lora(**batch, adapter_names=names)
        rows = {t: [i for i, n in enumerate(names) if n == t] for t in dict.fromkeys(names)}

        def switch():
            for t, idx in rows.items():
                sd.set_adapter(model, t)
                model(**{key: v[idx] for key, v in batch.items()})

        return switch

    with torch.no_grad():
        for tasks in args.tasks:  # warm up (and build the correction cache)
            for method in args.methods:
                measure(method, tasks)()
        for r in range(args.rounds):
            for tasks in args.tasks:
                for method in args.methods:
                    seconds = timed(measure(method, tasks), args.repeats)
                    results["tasks"][tasks]["times"].setdefault(method, []).append(seconds)
                    print(f"round {r + 1}  T={tasks:<3} {method:<7} {seconds * 1e3:9.1f} ms", file=sys.stderr)
    for tasks, entry in results["tasks"].items():
        model, lora = models[tasks]
        entry["median_s"] = {m: statistics.median(ts) for m, ts in entry.pop("times").items()}
        entry["rows_per_s"] = {m: args.rows / s for m, s in entry["median_s"].items()}
        entry["delta_bytes"] = delta_bytes(model)
        entry["lora_bytes"] = lora_bytes(lora)
    largest = max(args.tasks)
    results["profile"] = {"tasks": largest, "ops": profile_mixed(models[largest][0], batch, names_for(largest, args.rows))}
    return results


def report(results: dict) -> str:
    rows = results["rows"]
    lines = [
        f"batch {rows} x {results['seq']} tokens, deltas at {results['density']:.0%}, {results['threads']} threads",
        "",
        f"{'T':>3} {'mixed':>9} {'switch':>9} {'lora':>9} {'base':>9}  {'mixed/base':>10} {'switch/base':>11} "
        f"{'lora/base':>9} {'mixed/lora':>10}  {'k':>8} {'lora r':>6} {'delta MiB':>9} {'lora MiB':>8}",
    ]
    for tasks, e in results["tasks"].items():
        s = e["median_s"]
        times = [f"{s[m] * 1e3:.1f}" if m in s else "-" for m in ("mixed", "switch", "lora", "base")]
        pairs = [("mixed", "base"), ("switch", "base"), ("lora", "base"), ("mixed", "lora")]
        ratios = [f"{s[a] / s[b]:.2f}" if a in s and b in s else "-" for a, b in pairs]
        lines.append(
            f"{tasks:>3} {times[0]:>9} {times[1]:>9} {times[2]:>9} {times[3]:>9}  {ratios[0]:>10} {ratios[1]:>11} "
            f"{ratios[2]:>9} {ratios[3]:>10}  {e['k']:>8,} {e['lora_rank']:>6} {e['delta_bytes'] / 2**20:>9.1f} "
            f"{e['lora_bytes'] / 2**20:>8.1f}"
        )
    lines += ["", "times in ms (best of the repeats, median over rounds); memory: what the T tasks hold", "",
              f"profile of one mixed batch at T = {results['profile']['tasks']}:"]  # fmt: skip
    lines += [f"  {o['op']:<40} {o['calls']:>6} calls {o['self_ms']:>9.1f} ms {o['share']:>6.1%}" for o in results["profile"]["ops"]]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model folder (default: the embedded MiniLM-L6)")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 8 x 16, T = 1, 2, 8, one round")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--methods", nargs="+", default=["mixed", "switch", "lora", "base"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="timed calls per round (the best counts)")
    p.add_argument("--threads", type=int, default=None, help="(default: every core; --quick: 1)")
    p.add_argument("--output", type=Path, help="(default: bench/results/multitask[-quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.seq, args.tasks, args.rounds, args.repeats = 8, 16, [1, 2, 8], 1, 1
    if any(t > args.rows for t in args.tasks):
        p.error(f"--tasks: every T must be at most --rows ({args.rows})")
    if args.model is None:
        from sparsedelta.models.classifier import default_model_dir

        args.model = str(default_model_dir())
    if args.threads is None:  # a smoke run on one thread: on a busy machine a second one mostly waits
        import os

        args.threads = 1 if args.quick else os.cpu_count() or 1
    args.output = args.output or HERE / "results" / f"multitask{'-quick' if args.quick else ''}.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    print(f"\nresults: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
