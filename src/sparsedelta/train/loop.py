"""The training loop: from a `TrainConfig` to a finished run folder, with checkpoints and resume.

One function, `train`, read top to bottom: load data and model, let the method's runner attach
its delta, run AdamW over the runner's parameter groups with a warm-up + cosine (or linear)
schedule, evaluate, checkpoint, and write the run folder. Resuming restores everything that decides
the next step (trainable tensors, optimizer and scheduler state, random generators, the position in
the data order), so a resumed run ends where an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import __version__
from ..data.tables import Encoded, TextData, batches, encode, load_data
from ..errors import UsageError
from ..models.classifier import load_classifier
from ..report import plots
from . import distributed
from .runfolder import CONFIG, METRICS, RunFolder, new_run_path, peak_memory_mib
from .runners import Budget, MethodRunner, make_runner, trainable

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the embedded demo (MiniLM-L6 + BBC News, SaRA)."""

    # data (no file and no dataset: the embedded BBC News)
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    text_columns: list[str] | None = None
    label_column: str | None = None
    split_seed: int = 0
    validation_fraction: float = 0.1
    test_fraction: float = 0.2
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_validation_samples: int | None = None
    # model (None: the embedded MiniLM-L6)
    model: str | None = None
    max_length: int = 128
    # method and budget
    method: str = "sara"
    threshold: float | None = None
    density: float | None = None
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    parameter_kinds: list[str] | None = None
    modules_to_save: list[str] | None = None
    options: dict = field(default_factory=dict)  # method-specific config fields, e.g. {"rank_penalty": 5e-3}
    # optimisation
    epochs: float = 2.0
    max_steps: int | None = None
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float | None = None  # None: the method's default (SaRA: 1e-3·exp(−350·threshold))
    head_lr: float | None = None  # the densely trained head's lr (None: 5e-3 for deltas, lr otherwise)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 0
    # run
    output_dir: str | None = None
    eval_every: int | None = None  # steps; None: twice per epoch
    checkpoint_every: int = 50  # steps; 0: never
    threads: int | None = None
    device: str | None = None  # None: the GPU of this process when there is one, else the CPU

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in ("batch_size", "eval_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is None and not self.epochs > 0:
            raise UsageError(f"--epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps must be at least 1, got {self.max_steps}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class RunResult:
    folder: Path
    test: dict
    budget: Budget
    metrics: dict
    product: Path | None = None


# -- schedule, data order, evaluation --------------------------------------------------------------
def lr_factor(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def phased_lr_factor(schedule: str, warmup_ratio: float, starts: list[int], total: int):
    """The schedule started afresh (warm-up, then decay) at each phase start, e.g. Diff Pruning's
    fixed-mask phase, which trains new tensors with a fresh optimizer."""
    bounds = [*starts, total]
    phases = [(a, lr_factor(schedule, int(warmup_ratio * (b - a)), b - a)) for a, b in zip(bounds, bounds[1:])]

    def factor(step: int) -> float:
        start, phase = next(p for p in reversed(phases) if step >= p[0])
        return phase(step - start)

    return factor


def pick_device(requested: str | None, world: distributed.World) -> torch.device:
    if requested:
        try:
            return torch.device(requested)
        except RuntimeError as e:
            raise UsageError(f"--device {requested}: {e}; use cpu, cuda or cuda:N") from e
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world.active else torch.cuda.current_device())
    return torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def epoch_order(n: int, epoch: int, seed: int, world: distributed.World) -> list[int]:
    """This rank's example indices for an epoch: one seeded permutation shared by all ranks, padded by
    wrapping around to a multiple of the world size (as DistributedSampler), dealt out round-robin."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    padded = perm + perm[: (-n) % world.size]
    return padded[world.rank :: world.size]


def steps_per_epoch(n: int, batch_size: int, world: distributed.World) -> int:
    return math.ceil(math.ceil(n / world.size) / batch_size)


@torch.no_grad()
def evaluate(model, encoded: Encoded, tokenizer, num_labels: int, batch_size: int, world=None) -> dict:
    """Accuracy, macro-F1 and mean loss; ranks split the examples and add up their confusion matrices."""
    world = world or distributed.World()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    indices = list(range(world.rank, len(encoded), world.size))
    for batch in batches(encoded, indices, batch_size, tokenizer):
        batch = to_device(batch, device)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        confusion.index_put_((labels, logits.argmax(-1)), torch.ones(len(labels), dtype=torch.float64), accumulate=True)
    distributed.all_sum(confusion, world)
    distributed.all_sum(loss_sum, world)
    model.train(was_training)
    return scores(confusion.cpu(), float(loss_sum))


def scores(confusion: torch.Tensor, loss_sum: float) -> dict:
    n = float(confusion.sum())
    tp = confusion.diagonal()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    present = (confusion.sum(1) > 0) | (confusion.sum(0) > 0)
    return {
        "accuracy": float(tp.sum()) / max(n, 1),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "loss": loss_sum / max(n, 1),
        "examples": int(n),
    }


def state_fingerprint(runner: MethodRunner, model) -> str:
    """A hash of everything trained, to check that ranks agree bit for bit."""
    h = hashlib.sha256()
    state = runner.state_dict(model)

    def walk(obj, prefix=""):
        if isinstance(obj, torch.Tensor):
            h.update(prefix.encode())
            h.update(obj.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj):
                walk(obj[k], f"{prefix}/{k}")

    walk({k: v for k, v in state.items() if k != "rng"})
    return h.hexdigest()


# -- the loop --------------------------------------------------------------------------------------
def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, log=print) -> RunResult:
    """Run `cfg` into a run folder (resume=True: continue the run in cfg.output_dir from its checkpoint).

    Launched by torchrun, every process calls this; gradients are averaged across processes and only
    rank 0 writes or prints."""
    world = distributed.setup()
    try:
        return _train(cfg, world, resume, progress, log if world.main else (lambda *a, **k: None))
    finally:
        distributed.shutdown(world)


def _train(cfg: TrainConfig, world: distributed.World, resume: bool, progress: bool, log) -> RunResult:
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    runner = make_runner(cfg)  # an unknown method fails before anything is loaded
    if resume:
        folder = RunFolder.existing(cfg.output_dir)
    else:
        folder = RunFolder(cfg.output_dir or distributed.broadcast(str(new_run_path(cfg.method)), world))
        folder.check_new()
        cfg = dataclasses.replace(cfg, output_dir=str(folder.path))

    data = load_data(
        cfg.train_file, cfg.validation_file, cfg.test_file, cfg.dataset, cfg.dataset_config, cfg.text_columns,
        cfg.label_column, cfg.split_seed, cfg.validation_fraction, cfg.test_fraction, cfg.max_train_samples,
        cfg.max_eval_samples, cfg.max_validation_samples,
    )  # fmt: skip
    log(f"data: {data.source}: {data.sizes()}, {len(data.label_names)} labels {data.label_names}")
    for note in data.notes:
        log(f"      {note}")
    loaded = load_classifier(cfg.model, data.label_names, cfg.seed)
    device = pick_device(cfg.device, world)
    model, tokenizer = loaded.model.to(device), loaded.tokenizer
    encoded = {role: encode(tokenizer, getattr(data, role), cfg.max_length) for role in ("train", "validation", "test")}
    per_epoch = steps_per_epoch(len(encoded["train"]), cfg.batch_size, world)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    eval_every = cfg.eval_every or max(1, per_epoch // 2)
    load_s = time.perf_counter() - started

    t = time.perf_counter()
    model = runner.prepare(model, loaded.head_modules, total_steps)
    select_s = time.perf_counter() - t
    budget = runner.budget(model)
    log(f"model: {loaded.name} ({budget.total:,} parameters); new head trained densely: {loaded.head_modules}")
    log(f"method: {cfg.method}: {budget.trainable:,} trainable entries, density {budget.density:.3%} of the targets")

    factor = phased_lr_factor(cfg.schedule, cfg.warmup_ratio, runner.phase_starts(total_steps), total_steps)

    def optimizer_at(step: int):
        """AdamW over the runner's groups and the schedule, positioned at `step`."""
        optimizer = torch.optim.AdamW(runner.param_groups(model), betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=step - 1)

    metrics = {
        "title": f"{cfg.method} on {Path(data.source).name if cfg.train_file else data.source.split(' (')[0]}",
        "metric": "accuracy",
        "steps": [],
        "evals": [],
        "events": [],
        "timings": {"load_s": load_s, "select_s": select_s, "train_s": 0.0, "eval_s": 0.0, "segments": 1},
    }
    step, prior_total = 0, 0.0
    if resume:
        state = _restore(folder, runner, model, world)
        step, metrics = state["step"], _continued(state["metrics"], metrics)
        optimizer, scheduler = optimizer_at(step)  # after the runner's state: its groups may differ now
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        prior_total = metrics["timings"].get("total_s", 0.0)
        log(f"resumed {folder.path} at step {step} of {total_steps}")
    else:
        optimizer, scheduler = optimizer_at(0)
        if world.main:
            folder.write_json(CONFIG, _resolved(cfg, data, loaded, runner, budget, total_steps, per_epoch, world))

    num_labels = len(data.label_names)
    bar = tqdm(total=total_steps, initial=step, disable=not (progress and world.main), unit="step", dynamic_ncols=True)
    bar.set_description(f"{cfg.method} epoch {step // per_epoch + 1}")
    running = None
    model.train()
    while step < total_steps:
        epoch, offset = divmod(step, per_epoch)
        order = epoch_order(len(encoded["train"]), epoch, cfg.seed, world)[offset * cfg.batch_size :]
        bar.set_description(f"{cfg.method} epoch {epoch + 1}")
        for batch in batches(encoded["train"], order, cfg.batch_size, tokenizer):
            t = time.perf_counter()
            loss = model(**to_device(batch, device)).loss
            extra = runner.extra_loss(model, step)
            (loss if extra is None else loss + extra).backward()
            params = trainable(model)  # may change at a schedule event (e.g. SaRA's re-selection)
            distributed.average_gradients(params, world)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            event = runner.on_step(model, step, optimizer)
            if runner.params_changed:  # the method swapped its trainable tensors (e.g. a new phase)
                optimizer, scheduler = optimizer_at(step)
                runner.params_changed = False
            metrics["timings"]["train_s"] += time.perf_counter() - t

            loss_value = float(distributed.all_sum(loss.detach().double(), world)) / world.size
            record = {"step": step, "loss": loss_value, "lr": lr}
            if extra is not None:
                record["extra_loss"] = float(extra.detach())
            metrics["steps"].append(record)
            running = loss_value if running is None else 0.9 * running + 0.1 * loss_value
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            bar.update()
            if event:
                metrics["events"].append({"step": step, "event": event})
                if world.main and progress:
                    bar.write(f"step {step}: {event}")
            if step % eval_every == 0 or step == total_steps:
                t = time.perf_counter()
                val = evaluate(model, encoded["validation"], tokenizer, num_labels, cfg.eval_batch_size, world)
                metrics["timings"]["eval_s"] += time.perf_counter() - t
                metrics["evals"].append({"step": step, "epoch": step / per_epoch, "split": "validation", **val})
                bar.set_postfix(loss=f"{running:.4f}", val_acc=f"{val['accuracy']:.4f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                metrics["timings"]["total_s"] = prior_total + time.perf_counter() - started
                _checkpoint(folder, runner, model, optimizer, scheduler, step, metrics, world)
            if step >= total_steps:
                break
    bar.close()
    runner.finish(model)

    t = time.perf_counter()
    test = evaluate(model, encoded["test"], tokenizer, num_labels, cfg.eval_batch_size, world)
    metrics["timings"]["test_s"] = time.perf_counter() - t
    budget = runner.budget(model)
    metrics["test"] = test
    metrics["budget"] = {**dataclasses.asdict(budget), "density": budget.density}
    metrics["world_size"] = world.size
    metrics["rank_fingerprints"] = distributed.gather(state_fingerprint(runner, model), world)
    metrics["memory"] = {"peak_rss_mib": distributed.gather(peak_memory_mib(), world)}
    metrics["timings"]["total_s"] = prior_total + time.perf_counter() - started
    metrics["timings"]["steps_per_s"] = step / max(metrics["timings"]["train_s"], 1e-9)
    product = None
    if world.main:
        product = runner.save(model, tokenizer, folder.path)
        folder.write_json(METRICS, metrics)
        plots.training_plot(metrics, folder.path / "training.png")
        selection = runner.selection(model)
        if selection:
            plots.density_plot(selection, folder.path / "density.png", f"{cfg.method}: selected fraction per layer and tensor type")
        folder.remove_checkpoint()
    distributed.barrier(world)
    return RunResult(folder.path, test, budget, metrics, product)


def _resolved(cfg, data: TextData, loaded, runner, budget, total_steps, per_epoch, world) -> dict:
    return {
        "sparsedelta_version": __version__,
        "train": cfg.to_dict(),
        "model": loaded.name,
        "head_modules": loaded.head_modules,
        "method": runner.describe(),
        "labels": data.label_names,
        "data": {
            "source": data.source,
            "sizes": data.sizes(),
            "notes": data.notes,
            "text_columns": data.text_columns,
            "label_column": data.label_column,
        },
        "budget": {**dataclasses.asdict(budget), "density": budget.density},
        "total_steps": total_steps,
        "steps_per_epoch": per_epoch,
        "world_size": world.size,
    }


def _checkpoint(folder, runner, model, optimizer, scheduler, step, metrics, world) -> None:
    if world.main:
        folder.save_checkpoint(
            {
                "step": step,
                "world_size": world.size,
                "runner": runner.state_dict(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "metrics": metrics,
            }
        )
    distributed.barrier(world)


def _restore(folder, runner, model, world) -> dict:
    state = folder.load_checkpoint()
    if state["world_size"] != world.size:
        raise UsageError(
            f"the checkpoint in {folder.path} was written by {state['world_size']} process(es); "
            f"resume it with the same number (now {world.size})"
        )
    runner.load_state_dict(model, state["runner"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def _continued(metrics: dict, fresh: dict) -> dict:
    metrics["timings"]["segments"] = metrics["timings"].get("segments", 1) + 1
    metrics["timings"]["load_s"] += fresh["timings"]["load_s"]
    return metrics
