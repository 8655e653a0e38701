"""Measure the peak tensor memory of a training step, per method, model size, batch and precision, and
check `sparsedelta.train.memory.estimate` against it.

Each measurement runs in its own process: the model is loaded, the method attached (the same
setups as bench/bench.py: full fine-tuning, SaRA at 1%, PEFT LoRA r=8), one warm-up step taken (so
AdamW's state exists), and one step profiled: the peak of the bytes held by live tensors over the
step, split by what torch's memory profiler calls each tensor (parameter, gradient, optimizer
state, activation, temporary) at that moment. Live tensor bytes are what a GPU's allocator would
hold (plus its CUDA context); peak RSS on a CPU adds the libraries (~0.5 GiB) and the allocator's
caching, so it is not what is modelled.

    .venv/bin/python bench/memory_model.py            # MiniLM-L6 and SmolLM2-135M, 3 shapes, 3 methods, fp32 + bf16 (+ SaRA, LoRA on a bf16 base)
    .venv/bin/python bench/memory_model.py --fit      # refit the activation coefficients to the saved measurements
    .venv/bin/python bench/memory_model.py --check    # compare the saved measurements with the estimate
    .venv/bin/python bench/memory_model.py --table    # the largest model each method trains in 16 / 24 / 80 GB

Writes bench/results/memory-model.json: every measurement with the estimate beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "memory-model.json"
SHAPES = {"classification": [(4, 64), (8, 64), (4, 128)], "causal-lm": [(1, 64), (2, 64), (1, 128)]}
HELD_OUT = {"classification": [(16, 128)], "causal-lm": [(4, 128)]}  # not fitted to: checks the fit
BF16_BASES = ["sara@1%", "lora"]  # also measured on a base loaded in bf16 (bf16 autocast), at every shape
METHODS = {"full": "full", "sara@1%": "sara", "lora": "lora"}  # bench.py's setup name -> estimate's method
PRECISIONS = ["fp32", "bf16"]


def bench_module():
    spec = importlib.util.spec_from_file_location("bench", HERE / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def peak_by_category(step) -> dict:
    """The peak of live tensor bytes during `step()` and what those bytes were at that moment."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        step()
    profile_ = p._memory_profile()
    live: dict = {}  # tensor key -> (bytes, category)
    totals: dict[str, int] = {}
    peak, at_peak = 0, {}
    for _, action, (key, version), size in profile_.timeline:
        if action in (Action.PREEXISTING, Action.CREATE):
            category = profile_._categories.get(key, version)
            name = category.name.lower() if category is not None else "other"
            live[key] = (size, name)
            totals[name] = totals.get(name, 0) + size
        elif action == Action.DESTROY and key in live:
            size, name = live.pop(key)
            totals[name] -= size
        total = sum(totals.values())
        if total > peak:
            peak, at_peak = total, dict(totals)
    return {"peak_bytes": peak, "at_peak": {k: v for k, v in at_peak.items() if v}}


def worker(args) -> dict:
    import torch

    bench = bench_module()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = bench.load_model(args)
    if args.base_dtype != "float32":
        model = model.to(getattr(torch, args.base_dtype))
    params, extra_loss, _ = bench.setup(args.worker, model, args)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    inputs = bench.make_batch(args)
    model.train()

    def step():
        with bench.autocast(args.precision):
            loss = model(**inputs).loss.float()
        if extra_loss:
            loss = loss + extra_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    return {
        "model": args.model_label,
        "task": args.task,
        "method": args.worker,
        "precision": args.precision,
        "base_dtype": args.base_dtype,
        "batch": args.batch,
        "seq": args.seq,
        "trainable": sum(p.numel() for p in params),
        **peak_by_category(step),
    }


def run_worker(task: str, model: Path, label: str, method: str, precision: str, batch: int, seq: int, threads: int,
               base_dtype: str = "float32"):  # fmt: skip
    cmd = [sys.executable, __file__, "--worker", method, "--task", task, "--model", str(model), "--model-label", label,
           "--precision", precision, "--batch", str(batch), "--seq", str(seq), "--threads", str(threads),
           "--base-dtype", base_dtype]  # fmt: skip
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{label} {method} {precision} {batch}x{seq} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimate_of(run: dict, shapes: dict):
    from sparsedelta.train.memory import estimate

    return estimate(shapes[run["model"]], METHODS[run["method"]], batch=run["batch"], seq=run["seq"],
                    precision=run["precision"], base_dtype=run.get("base_dtype", "float32"), density=0.01,
                    lora_rank=8, task=run["task"])  # fmt: skip


def with_estimates(runs: list[dict], shapes: dict) -> list[dict]:
    """Each run with the estimate for its setting and the relative error."""
    for r in runs:
        r["estimate_bytes"] = estimate_of(r, shapes).total
        r["error"] = r["estimate_bytes"] / r["peak_bytes"] - 1
    return runs


def fit(runs: list[dict], shapes: dict) -> dict[str, list[float]]:
    """Activation bytes per token (per layer x hidden, x intermediate, x heads x seq where the attention
    keeps its probabilities, per output width), per regime (fp32; bf16 autocast over float32 weights;
    a bf16 base), from the runs whose peak holds the activations (not full fine-tuning's, which peaks
    at the optimizer step): least squares on the relative error, coefficients kept non-negative."""
    import torch

    from sparsedelta.train.memory import ACTIVATION, activation_bytes, regime

    coefficients = {}
    for name in ACTIVATION:
        rows, targets = [], []
        for r in runs:
            base_dtype = r.get("base_dtype", "float32")
            if regime(r["precision"], base_dtype) != name or r["method"] == "full" or r.get("held_out"):
                continue
            shape, est = shapes[r["model"]], estimate_of(r, shapes)
            own = activation_bytes(shape, r["batch"], r["seq"], r["precision"], base_dtype)
            measured = r["peak_bytes"] - est.weights - est.state - (est.activations - own)
            tokens = r["batch"] * r["seq"]
            probs = shape.heads * r["seq"] if shape.keeps_attention_probs else 0
            features = [tokens * shape.layers * shape.hidden, tokens * shape.layers * shape.intermediate,
                        tokens * shape.layers * probs, tokens * shape.output_width]  # fmt: skip
            rows.append([f / measured for f in features])
            targets.append(1.0)
        a, b = torch.tensor(rows, dtype=torch.float64), torch.tensor(targets, dtype=torch.float64)
        active = list(range(a.shape[1]))
        while True:  # drop the coefficients that come out negative and refit
            solution = torch.linalg.lstsq(a[:, active], b[:, None]).solution[:, 0]
            if (solution >= 0).all():
                break
            active = [i for i, v in zip(active, solution.tolist(), strict=True) if v >= 0]
        full = [0.0] * a.shape[1]
        for i, v in zip(active, solution.tolist(), strict=True):
            full[i] = round(v, 2)
        coefficients[name] = full
    return coefficients


def print_runs(runs: list[dict]) -> None:
    print(f"\n{'model':<14}{'method':<19}{'prec':<6}{'batch':>8}{'measured MiB':>14}{'estimate MiB':>14}{'error':>8}  at the peak (MiB)")
    for r in runs:
        parts = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in sorted(r["at_peak"].items(), key=lambda kv: -kv[1]))
        print(
            f"{r['model']:<14}{r['method'] + (' bf16 base' if r.get('base_dtype', 'float32') != 'float32' else ''):<19}{r['precision']:<6}{r['batch']:>4}x{r['seq']:<3}{'*' if r.get('held_out') else ' '}"
            f"{r['peak_bytes'] / 2**20:>14.0f}{r.get('estimate_bytes', 0) / 2**20:>14.0f}{r.get('error', 0):>8.1%}  {parts}"
        )


TABLE_ROWS = {  # label -> estimate settings
    "full fine-tuning (float32 weights)": {"method": "full"},
    "LoRA r=16, float32 base": {"method": "lora", "lora_rank": 16},
    "LoRA r=16, bf16 base": {"method": "lora", "lora_rank": 16, "base_dtype": "bfloat16"},
    "SaRA 1%, float32 base": {"method": "sara", "density": 0.01},
    "SaRA 1%, bf16 base": {"method": "sara", "density": 0.01, "base_dtype": "bfloat16"},
}


def print_table(batch: int = 4, seq: int = 512, budgets=(16, 24, 80)) -> None:
    """Markdown: per method, the largest REFERENCE model whose estimated peak fits each budget (less
    1 GiB for the CUDA context), bf16 autocast, AdamW's foreach step, no activation checkpointing."""
    from sparsedelta.train.memory import REFERENCE, estimate, largest_fitting, model_shape

    print(f"batch {batch} x {seq} tokens, bf16 autocast, AdamW on a GPU (foreach), no activation checkpointing\n")
    print("| method | " + " | ".join(f"{b} GB" for b in budgets) + " | peak for Llama-3.1-8B |")
    print("|---|" + "---|" * (len(budgets) + 1))
    eight = model_shape("llama-3.1-8b")
    for label, settings in TABLE_ROWS.items():
        common = {"batch": batch, "seq": seq, "precision": "bf16", "device": "cuda", **settings}
        cells = [largest_fitting(b * 1e9 / 2**30, **common) or "none" for b in budgets]
        peak = estimate(eight, task="causal-lm", **common).total / 2**30
        print(f"| {label} | " + " | ".join(cells) + f" | {peak:.1f} GiB |")
    print("\nmodels: " + ", ".join(REFERENCE))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--check", action="store_true", help="only compare the saved measurements with the estimate")
    parser.add_argument("--fit", action="store_true", help="fit the activation coefficients to the saved measurements")
    parser.add_argument("--table", action="store_true", help="print the largest model each method trains in 16/24/80 GB")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--task", default="classification", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-label", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--base-dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.table:
        print_table()
        return

    from sparsedelta.train.memory import model_shape

    bench = bench_module()
    models = {"MiniLM-L6": ("classification", bench.default_model("classification")),
              "SmolLM2-135M": ("causal-lm", bench.default_model("causal-lm"))}  # fmt: skip
    shapes = {label: model_shape(str(path), task) for label, (task, path) in models.items()}
    if args.fit:
        print(json.dumps(fit(json.loads(RESULTS.read_text())["runs"], shapes)))
        return
    if args.check:
        record = json.loads(RESULTS.read_text())
        runs = with_estimates(record["runs"], shapes)
    else:
        started, runs = time.time(), []
        for label, (task, path) in models.items():
            for method in METHODS:
                for precision in PRECISIONS:
                    for batch, seq in SHAPES[task] + HELD_OUT[task]:
                        print(f"{label} {method} {precision} {batch}x{seq}", flush=True)
                        run = run_worker(task, path, label, method, precision, batch, seq, args.threads)
                        runs.append({**run, "held_out": (batch, seq) in HELD_OUT[task]})
                if method in BF16_BASES:
                    for batch, seq in SHAPES[task] + HELD_OUT[task]:
                        print(f"{label} {method} on a bf16 base {batch}x{seq}", flush=True)
                        run = run_worker(task, path, label, method, "bf16", batch, seq, args.threads, "bfloat16")
                        runs.append({**run, "held_out": (batch, seq) in HELD_OUT[task]})
        runs = with_estimates(runs, shapes)
        record = {"date": time.strftime("%Y-%m-%d"), "wall_s": time.time() - started}
    import torch

    record.update({"torch": torch.__version__, "runs": runs})
    print_runs(runs)
    for held_out in (False, True):
        errors = [abs(r["error"]) for r in runs if bool(r.get("held_out")) == held_out]
        if errors:
            what = "held-out settings (not fitted to)" if held_out else "settings the activations were fitted to"
            print(f"{what}: largest |error| {max(errors):.1%}, mean {sum(errors) / len(errors):.1%} over {len(errors)}")
            record["max_abs_error_held_out" if held_out else "max_abs_error_fitted"] = max(errors)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
